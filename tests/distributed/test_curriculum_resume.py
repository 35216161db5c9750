"""`cropi run` killed at any point and restarted ends where an uninterrupted run ends.

A complete tiny curriculum (warm-up, behaviour rollouts, 2 stages of scoring, selection and GRPO) runs
once uninterrupted, and once killed repeatedly: by SIGKILL at a random moment, then by injected deaths
(``CROPI_FAULT_AT``) in the behaviour rollouts, mid-scoring, right after a selection is written and
mid-training, each followed by a restart. Selections, evaluation records and the final parameters
(the run's HF export) must be identical.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

def _write(tmp: Path, out: Path, **changes) -> Path:
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    path = tmp / f"cfg-{out.name}-{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(tiny_curriculum_config(str(out), **changes)))
    return path


def _cropi(cfg: Path, *extra, fault=None):
    from megatron_cropi.testing.cli import run_cli

    return run_cli(["run", str(cfg), *extra], fault=fault, timeout=240)


def _outcome(out: Path) -> dict:
    from megatron_cropi.testing.cli import run_outcome

    return run_outcome(out)


@pytest.mark.timeout(900)
def test_killed_and_restarted_run_equals_uninterrupted(tmp_path):
    a = tmp_path / "a"
    cfg_a = _write(tmp_path, a)
    t0 = time.time()
    rc, log = _cropi(cfg_a)
    assert rc == 0, log[-4000:]
    duration = time.time() - t0
    ref = _outcome(a)
    assert len(ref["selections"]) == 2 and ref["selections"]["stage0.json"]["policy"] == "cropi"

    # a changed config on resume is refused, naming the change
    rc, log = _cropi(_write(tmp_path, a, **{"selection.ratio": 0.5}))
    assert rc == 2 and "selection.ratio: 0.25 -> 0.5" in log, log[-2000:]

    b = tmp_path / "b"
    cfg_b = _write(tmp_path, b)
    # SIGKILL at a random moment of the run
    from megatron_cropi.testing.cli import cli_env

    proc = subprocess.Popen([sys.executable, "-m", "megatron_cropi.cli", "run", str(cfg_b)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(os.getpid()).uniform(0.3, 0.8) * duration)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for fault in ("rollouts:pool", "score:chunk", "select", "train:step", "score:chunk", "train:step"):
        rc, log = _cropi(cfg_b, fault=fault)
        assert rc in (0, 17), log[-3000:]
    rc, log = _cropi(cfg_b)
    assert rc == 0, log[-3000:]
    got = _outcome(b)
    assert got["selections"] == ref["selections"]
    assert got["evals"] == ref["evals"]
    assert set(got["params"]) == set(ref["params"])
    for name, t in ref["params"].items():
        assert (got["params"][name] == t).all(), f"{name} differs after kill/resume"
