"""``scripts/gpu_check.sh``: parses, lists every GPU test file, runs them under the ``gpu`` marker with
a budget, smoke-runs ``cropi run`` with CROPI selection enforced, and fails fast without CUDA."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _listed() -> list[str]:
    block = re.search(r"^GPU_TESTS=\(\n(.*?)^\)", SCRIPT.read_text(), flags=re.M | re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_gpu_check_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_lists_every_gpu_test_file_once():
    on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    listed = _listed()
    assert len(listed) == len(set(listed))
    assert sorted(listed) == on_disk


def test_gpu_check_runs_the_marked_tier_within_a_budget_and_smoke_runs_cropi():
    text = SCRIPT.read_text()
    assert "gpu" in (ROOT / "pytest.ini").read_text()            # the marker the tier uses
    assert '-m gpu' in text and "-rs" in text                      # the marked tests, with skip reasons
    assert "GPU_CHECK_BUDGET_S:-480" in text and "timeout" in text  # under 8 minutes, enforced
    assert "megatron_cropi.cli run --dry-run" in text and "megatron_cropi.cli run \"$smoke/config.yaml\"" in text
    assert '"selection.fallback": "error"' in text and 'sel["policy"] == "cropi"' in text
    assert "save_tiny_hf_model" in text                            # an HF-shaped model, built locally
    assert "pkill" not in text and "killall" not in text
    assert re.search(r"^\(\(failed == 0\)\)$", text, flags=re.M)   # the exit status says whether all passed


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_check_without_cuda_fails_fast_with_one_line(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path),
                               "HOME": str(tmp_path)})
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("FAIL cuda") and "torch.cuda.is_available() is False" in lines[0]
    assert lines[-1].startswith("gpu_check: no CUDA device")
