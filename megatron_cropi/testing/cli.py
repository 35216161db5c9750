"""Run the ``cropi`` command in a fresh process, as a user would (tests of kill and resume)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["assert_same_features", "cli_env", "run_cli", "run_outcome"]

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROPI_FAULT_AT")


def cli_env(fault: str | None = None) -> dict:
    """This environment without torchrun's variables (or an earlier fault), one thread, and
    ``CROPI_FAULT_AT=fault`` when given."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in _LAUNCH_VARS:
        env.pop(var, None)
    if fault:
        env["CROPI_FAULT_AT"] = fault
    return env


def run_cli(args: list[str], *, fault: str | None = None, nproc: int = 1, timeout: float = 300.0):
    """``cropi ARGS`` (under torchrun when ``nproc > 1``); returns ``(returncode, stdout+stderr)``.

    Output goes to a file, not a pipe: a process that dies abruptly may leave children that hold a
    pipe open, and reading it would wait for them.
    """
    cmd = [sys.executable, "-m", "megatron_cropi.cli", *args]
    if nproc > 1:
        from megatron_cropi.utils.net import free_port

        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "megatron_cropi.cli", *args]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cli_env(fault))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        out.seek(0)
        return rc, out.read()


# evaluation fields that measure time, not the policy: two runs of the same work differ in them
_TIMING_FIELDS = ("seconds", "clock_seconds", "background_seconds")


def run_outcome(out: str | Path) -> dict:
    """What a finished ``cropi run`` in ``out`` decided, for comparing runs: ``selections`` (each stage's
    selection, its timing dropped), ``evals`` (``metrics/eval.jsonl`` without timing fields) and ``params``
    (the final HF export's tensors)."""
    import json

    from safetensors.torch import load_file

    from megatron_cropi.selection.stored import read_selection

    out = Path(out)
    sels = {p.name: read_selection(p).to_dict() for p in sorted((out / "selections").glob("stage*.json"))}
    for sel in sels.values():
        sel["summary"].pop("seconds", None)
    evals = [json.loads(x) for x in (out / "metrics" / "eval.jsonl").read_text().splitlines() if x]
    for rec in evals:
        for key in _TIMING_FIELDS:
            rec.pop(key, None)
    return {"selections": sels, "evals": evals, "params": load_file(str(out / "final_hf" / "model.safetensors"))}


def assert_same_features(a: str | Path, b: str | Path, *, stages=(0, 1), names=("pool", "target-cmp"),
                         atol: float = 1e-6) -> None:
    """The feature stores ``features/stage{m}/{name}`` of the runs in ``a`` and ``b`` hold the same statuses
    and features within ``atol``."""
    import numpy as np

    from megatron_cropi.influence.feature_store import FeatureStore

    for stage in stages:
        for name in names:
            x = FeatureStore.load(Path(a) / "features" / f"stage{stage}" / name)
            y = FeatureStore.load(Path(b) / "features" / f"stage{stage}" / name)
            np.testing.assert_array_equal(y.statuses(), x.statuses())
            np.testing.assert_allclose(y.matrix(), x.matrix(), rtol=0, atol=atol)
