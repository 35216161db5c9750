#!/usr/bin/env bash
# One prepared GPU check: on a machine with one GPU (or more), run the whole GPU tier and a one-stage
# `cropi run` smoke run of a small HF-shaped model, in under 8 minutes, one summary line per check.
# Run it first on any new GPU machine or image (docs/at_scale.md §5, README "GPU"):
#
#   bash scripts/gpu_check.sh                 # from the repository root (in the image: /opt/megatron_cropi)
#
# Environment (default):
#   PYTHON (python; .venv/bin/python when it exists)   GPU_CHECK_BUDGET_S (480: all checks together)
#   GPU_CHECK_DIR (a new temporary directory: logs and the smoke run)
#   GPU_CHECK_ALLOW_SKIPS (0: a GPU test skipped for any reason but "needs two GPUs" fails its check,
#                          e.g. Transformer Engine or the CUDA vllm build missing; 1: report and pass)
#
# Exit status: 0 when every check passed, 1 otherwise. Logs: $GPU_CHECK_DIR/<check>.log.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
ALLOW_SKIPS=${GPU_CHECK_ALLOW_SKIPS:-0}
DIR=${GPU_CHECK_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# The GPU tier, fastest first (tests/unit/test_gpu_check.py checks that this lists every tests/gpu file).
GPU_TESTS=(
    tests/gpu/test_gpt_gpu.py
    tests/gpu/test_projection_gpu.py
    tests/gpu/test_capture_gpu.py
    tests/gpu/test_grpo_gpu.py
    tests/gpu/test_vllm_cuda_engine.py
    tests/gpu/test_cropi_run_gpu.py
)

start=$(date +%s)
failed=0
total=0

left() { echo $((BUDGET_S - ($(date +%s) - start))); }

report() {  # report NAME STATUS SECONDS DETAIL
    printf '%-4s %-28s %5ss  %s\n' "$2" "$1" "$3" "$4"
    total=$((total + 1))
    if [[ $2 != PASS ]]; then failed=$((failed + 1)); fi
}

# 0. a CUDA device is there at all
t0=$(date +%s)
if device=$("$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__)' 2>"$DIR/cuda.log"); then
    report cuda PASS $(($(date +%s) - t0)) "$device"
else
    report cuda FAIL $(($(date +%s) - t0)) "$(tail -n 1 "$DIR/cuda.log")"
    echo "gpu_check: no CUDA device; nothing else can run (logs: $DIR)"
    exit 1
fi

# 1. the GPU tier, one check per file
for test in "${GPU_TESTS[@]}"; do
    name=$(basename "$test" .py)
    t0=$(date +%s)
    budget=$(left)
    if ((budget <= 0)); then
        report "$name" FAIL 0 "not run: the ${BUDGET_S} s budget is spent"
        continue
    fi
    timeout --kill-after=10 "$budget" "$PYTHON" -m pytest -o addopts= -q -rs -m gpu -p no:cacheprovider "$test" \
        > "$DIR/$name.log" 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    counts=$(grep -Eo '[0-9]+ (passed|failed|skipped|error|errors)' "$DIR/$name.log" | tr '\n' ' ' | sed 's/ $//')
    bad_skips=$(grep -E '^SKIPPED' "$DIR/$name.log" | grep -v 'needs two GPUs' || true)
    if ((rc == 124 || rc == 137)); then
        report "$name" FAIL "$secs" "timed out (budget ${BUDGET_S} s); log $DIR/$name.log"
    elif ((rc != 0)); then
        report "$name" FAIL "$secs" "${counts:-pytest exit $rc}; log $DIR/$name.log"
    elif ! grep -Eq '[0-9]+ passed' "$DIR/$name.log"; then
        report "$name" FAIL "$secs" "nothing passed (${counts:-no tests}); log $DIR/$name.log"
    elif [[ -n $bad_skips && $ALLOW_SKIPS != 1 ]]; then
        report "$name" FAIL "$secs" "$counts; skipped: $(echo "$bad_skips" | head -n 1 | sed 's/^SKIPPED \[[0-9]*\] //')"
    else
        report "$name" PASS "$secs" "$counts"
    fi
done

# 2. `cropi run` from the command line: a tiny random Qwen2 HF directory (built here with transformers,
#    no hub access), the synthetic suite, warm-up, behaviour rollouts, one stage of scoring, CROPI
#    selection (no fallback allowed), GRPO, report and HF export; the CUDA vLLM engine when installed.
t0=$(date +%s)
smoke="$DIR/smoke"
budget=$(left)
if ((budget <= 0)); then
    report cropi_run_smoke FAIL 0 "not run: the ${BUDGET_S} s budget is spent"
else
    (
        set -e
        "$PYTHON" - "$smoke" <<'EOF'
import importlib.util
import sys
from pathlib import Path

import yaml

from megatron_cropi.testing.hf_tiny import save_tiny_hf_model
from megatron_cropi.testing.tiny import tiny_curriculum_config

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
hf = save_tiny_hf_model(out / "init_hf", "qwen2", tied=True, vocab_size=256, hidden_size=256, num_layers=2,
                        num_heads=4, num_kv_heads=2, intermediate_size=512, rope_theta=10000.0,
                        max_position_embeddings=256)
cfg = tiny_curriculum_config(str(out / "run"), **{
    "model.preset": "tiny-vllm", "model.layer_spec": "local", "curriculum.stages": 1,
    "curriculum.pool_samples": 8, "curriculum.target_samples": 8, "selection.fallback": "error",
    "grpo.loss.kl_coef": 0.001, "run.num_threads": 0})
cfg["rollout"]["checkpoint"] = str(hf)
if importlib.util.find_spec("vllm") is not None:
    cfg["rollout"].update(engine="vllm", vllm={"dtype": "float32", "gpu_memory_utilization": 0.3,
                                              "max_model_len": 64, "enforce_eager": False})
    cfg["grpo"]["old_logprobs"] = "recompute"
(out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
(out / "engine").write_text(cfg["rollout"]["engine"])
EOF
        "$PYTHON" -m megatron_cropi.cli run --dry-run "$smoke/config.yaml" --world-size 1 --gpus-per-node 1 >/dev/null
        budget=$(left)
        timeout --kill-after=10 "$((budget > 1 ? budget : 1))" "$PYTHON" -m megatron_cropi.cli run "$smoke/config.yaml"
        "$PYTHON" - "$smoke/run" <<'EOF'
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
done = set(json.loads((run / "state.json").read_text())["done"])
need = {"stage0/score/pool", "stage0/train", "stage0/report", "final_hf"}
assert need <= done, f"steps not done: {sorted(need - done)}"
sel = json.loads((run / "selections" / "stage0.json").read_text())
assert sel["policy"] == "cropi" and "fallback" not in sel["summary"], sel["summary"]
assert (run / "final_hf" / "config.json").is_file()
used = sum(t["target_prompts_used"] for t in sel["summary"]["targets"].values())
print(f"selected {len(sel['prompt_ids'])} of {sel['summary']['pool']} by CROPI, {used} target prompts")
EOF
    ) > "$smoke.log" 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    if ((rc == 0)); then
        report cropi_run_smoke PASS "$secs" "engine $(cat "$smoke/engine"); $(tail -n 1 "$smoke.log")"
    else
        report cropi_run_smoke FAIL "$secs" "exit $rc: $(grep -v '^\s*$' "$smoke.log" | tail -n 1 | cut -c1-160); log $smoke.log"
    fi
fi

elapsed=$(($(date +%s) - start))
echo "gpu_check: $((total - failed))/$total checks passed in ${elapsed} s (budget ${BUDGET_S} s); logs: $DIR"
((failed == 0))
