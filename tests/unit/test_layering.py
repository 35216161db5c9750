"""Architecture rules that code review alone would not keep."""

import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "megatron_cropi"


def test_only_parallel_py_touches_megatron_parallel_state():
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "parallel.py" and path.parent == PKG:
            continue
        text = path.read_text()
        if re.search(r"parallel_state|megatron\.core\s+import\s+.*\bmpu\b", text):
            offenders.append(str(path.relative_to(PKG)))
    assert not offenders, f"only megatron_cropi/parallel.py may use megatron.core.parallel_state: {offenders}"


def test_cpu_runtime_is_the_only_cuda_redirect():
    offenders = [
        str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
        if p.name != "cpu_runtime.py" and re.search(r"torch\.cuda\.\w+\s*=", p.read_text())
    ]
    assert not offenders, f"torch.cuda is patched outside cpu_runtime.py: {offenders}"
