"""`cropi run` killed at any point and restarted ends where an uninterrupted run ends.

A complete tiny curriculum (warm-up, behaviour rollouts, 2 stages of scoring, selection and GRPO) runs
once uninterrupted, and once killed repeatedly: by SIGKILL at a random moment, then by injected deaths
(``CROPI_FAULT_AT``) in the behaviour rollouts, mid-scoring, right after a selection is written and
mid-training, each followed by a restart. Selections, evaluation records and the final parameters
(the run's HF export) must be identical.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

CONFIG = {
    "run": {"seed": 5, "num_threads": 1},
    "model": {"preset": "cpu-default"},
    "data": {"kind": "synthetic", "synthetic": {"per_family": 12, "val_size": 12, "test_size": 12,
                                                "check_per_family": 4, "families": ["cmp", "add1", "max", "rev"],
                                                "target": "cmp"}},
    "rollout": {"engine": "native", "n": 4, "max_tokens": 6, "progress": False, "batch_prompts": 16},
    "projection": {"kind": "sjlt", "k": 512, "keep_ratio": 0.5},
    "scoring": {"prompts_per_microbatch": 4, "microbatches_per_call": 1},
    "selection": {"policy": "cropi", "ratio": 0.25},
    "grpo": {"prompts_per_step": 4, "micro_batch_prompts": 4, "loss": {"kl_coef": 0.0, "entropy_coef": 0.0},
             "optim": {"lr": 3.0e-4}, "checkpoint": {"save_interval": 2}},
    "curriculum": {"stages": 2, "steps_per_stage": 3, "pool_samples": 4, "target_samples": 4,
                   "warmup": {"enabled": True, "max_steps": 60, "eval_every": 60, "stop_at_greedy": 1.0},
                   "eval": {"every": 3, "samples": 2, "check": False}, "probe_prompts": 0},
}


def _write(tmp: Path, out: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["run"]["output_dir"] = str(out)
    for dotted, value in changes.items():
        node = cfg
        *path, leaf = dotted.split(".")
        for key in path:
            node = node[key]
        node[leaf] = value
    path = tmp / f"cfg-{out.name}-{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(fault=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROPI_FAULT_AT"):
        env.pop(var, None)
    if fault:
        env["CROPI_FAULT_AT"] = fault
    return env


def _cropi(cfg: Path, *extra, fault=None, timeout=240):
    # Output goes to files, not pipes: a process that dies abruptly may leave children holding a pipe.
    out, err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen([sys.executable, "-m", "megatron_cropi.cli", "run", str(cfg), *extra], stdout=out,
                         stderr=err, env=_env(fault))
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(p.args, rc, out.read(), err.read())


def _outcome(out: Path) -> dict:
    from safetensors.torch import load_file

    sels = {p.name: json.loads(p.read_text()) for p in sorted((out / "selections").glob("stage*.json"))}
    for s in sels.values():
        s["summary"].pop("seconds", None)
    evals = [json.loads(x) for x in (out / "metrics" / "eval.jsonl").read_text().splitlines() if x]
    for e in evals:
        e.pop("seconds", None)
        e.pop("clock_seconds", None)
    params = load_file(str(out / "final_hf" / "model.safetensors"))
    return {"selections": sels, "evals": evals, "params": params}


@pytest.mark.timeout(900)
def test_killed_and_restarted_run_equals_uninterrupted(tmp_path):
    a = tmp_path / "a"
    cfg_a = _write(tmp_path, a)
    t0 = time.time()
    res = _cropi(cfg_a)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    duration = time.time() - t0
    ref = _outcome(a)
    assert len(ref["selections"]) == 2 and ref["selections"]["stage0.json"]["policy"] == "cropi"

    # a changed config on resume is refused, naming the change
    res = _cropi(_write(tmp_path, a, **{"selection.ratio": 0.5}))
    assert res.returncode == 2 and "selection.ratio: 0.25 -> 0.5" in res.stderr, res.stderr[-2000:]

    b = tmp_path / "b"
    cfg_b = _write(tmp_path, b)
    # SIGKILL at a random moment of the run
    proc = subprocess.Popen([sys.executable, "-m", "megatron_cropi.cli", "run", str(cfg_b)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(os.getpid()).uniform(0.3, 0.8) * duration)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for fault in ("rollouts:pool", "score:chunk", "select", "train:step", "score:chunk", "train:step"):
        res = _cropi(cfg_b, fault=fault)
        assert res.returncode in (0, 17), res.stderr[-3000:]
    res = _cropi(cfg_b)
    assert res.returncode == 0, res.stderr[-3000:]
    got = _outcome(b)
    assert got["selections"] == ref["selections"]
    assert got["evals"] == ref["evals"]
    assert set(got["params"]) == set(ref["params"])
    for name, t in ref["params"].items():
        assert (got["params"][name] == t).all(), f"{name} differs after kill/resume"
