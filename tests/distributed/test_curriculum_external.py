"""A two-stage curriculum whose stages are trained by an external command (``cropi train`` plus an HF
export), killed inside the second stage's command and restarted, ends with the selections, evaluations
and final policy of an uninterrupted run; the first stage's command is not run again.

The external trainer is a script written here: it checks that the stage's selection arrives as a verl
Parquet file the loaders read, runs ``cropi train`` from ``{checkpoint_in}`` in a work directory of its
own (so a re-run resumes from its own GRPO checkpoints), and exports the last checkpoint to
``{checkpoint_out}``. With ``EXT_PAUSE_STAGE=m`` it stops after stage m's first GRPO checkpoint, says
so in a file and waits, so the test can SIGKILL the whole run there.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TRAINER = r'''
import os, subprocess, sys, time
from pathlib import Path

base, checkpoint_in, checkpoint_out, stage, parquet, work = sys.argv[1:7]
from megatron_cropi.data.loaders import read_rows

rows = [row for _, row in read_rows(parquet)]
assert rows and all(r["prompt"][-1]["role"] == "user" and r["reward_model"]["ground_truth"] for r in rows), rows
out_dir = Path(work) / f"stage{stage}"
proc = subprocess.Popen([sys.executable, "-m", "megatron_cropi.cli", "train", base, f"run.output_dir={out_dir}",
                         f"rollout.checkpoint={checkpoint_in}"])
if os.environ.get("EXT_PAUSE_STAGE") == stage:
    while proc.poll() is None and not any((out_dir / "train" / "checkpoints").glob("step_*/meta.json")):
        time.sleep(0.1)
    (Path(work) / "paused").write_text(stage)
    while True:  # killed here by the test, with the run and cropi train
        time.sleep(1)
if proc.wait():
    sys.exit(proc.returncode)

from megatron_cropi.checkpoint import save_model_as_hf
from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint
from megatron_cropi.parallel import build_parallel_groups, init_distributed
from megatron_cropi.run_config import load_run_config
from megatron_cropi.wiring import build_policy_model

cfg = load_run_config(base, [f"run.output_dir={out_dir}"])
init_distributed(allow_single=True)
groups = build_parallel_groups(1, 1, seed=cfg.run.seed)
model = build_policy_model(cfg, groups)
load_checkpoint(latest_checkpoint(out_dir / "train" / "checkpoints"), model=model, groups=groups, restore_rng=False)
save_model_as_hf(model, groups, cfg.model, checkpoint_out, overwrite=True)
'''


def _setup(tmp: Path, name: str) -> tuple[Path, Path, Path]:
    """``(config, run dir, the trainer's work dir)`` of one run."""
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    script, base = tmp / "ext_train.py", tmp / "stage_train.yaml"
    if not script.exists():
        script.write_text(TRAINER)
        base.write_text(yaml.safe_dump(tiny_curriculum_config(
            str(tmp / "unused"), **{"grpo.steps": 3, "grpo.eval_interval": 0, "grpo.checkpoint.save_interval": 1})))
    out, work = tmp / name, tmp / f"work-{name}"
    command = (f"{sys.executable} {script} {base} {{checkpoint_in}} {{checkpoint_out}} {{stage}} "
               f"{{selection_parquet}} {work}")
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(tiny_curriculum_config(
        str(out), **{"curriculum.trainer": {"kind": "external", "command": command}})))
    return cfg, out, work


def _outcome(out: Path) -> dict:
    from safetensors.torch import load_file

    from megatron_cropi.testing.cli import run_outcome

    got = run_outcome(out)
    return {**got, "final": got.pop("params"),
            "stage1": load_file(str(out / "external" / "stage1" / "hf" / "model.safetensors"))}


def _same(a: dict, b: dict) -> None:
    import torch

    assert a["selections"] == b["selections"]
    assert a["evals"] == b["evals"]
    for key in ("final", "stage1"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


@pytest.mark.timeout(1500)
def test_external_stages_killed_in_second_command_resume_to_the_same_end(tmp_path):
    from megatron_cropi.testing.cli import cli_env, run_cli

    cfg_a, out_a, _ = _setup(tmp_path, "a")
    rc, log = run_cli(["run", str(cfg_a)], timeout=900)
    assert rc == 0, log[-4000:]
    ref = _outcome(out_a)
    assert len(ref["selections"]) == 2 and all(s["policy"] == "cropi" for s in ref["selections"].values())
    assert (out_a / "selections" / "stage1.parquet").is_file() and (out_a / "selections" / "stage1.jsonl").is_file()
    state = json.loads((out_a / "state.json").read_text())
    assert state["info"]["stage1/train"]["step"] == 6 and state["info"]["stage1/train"]["ran_command"]
    # the final policy is the external command's last checkpoint, bit for bit
    assert all(ref["final"][k].equal(ref["stage1"][k]) for k in ref["final"])

    cfg_b, out_b, work_b = _setup(tmp_path, "b")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_cropi.cli", "run", str(cfg_b)],
                            env={**cli_env(), "EXT_PAUSE_STAGE": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not (work_b / "paused").exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before stage 1's command paused"
        assert time.monotonic() < deadline, "stage 1's command never paused"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the run, the command's shell, the script and its cropi train
    proc.wait()
    assert not (out_b / "external" / "stage1" / "hf").exists()
    rc, log = run_cli(["run", str(cfg_b)], timeout=900)
    assert rc == 0, log[-4000:]
    _same(_outcome(out_b), ref)
    runs = {m: (out_b / "external" / f"stage{m}.log").read_text().count("\n$ ") for m in (0, 1)}
    assert runs == {0: 1, 1: 2}, runs  # stage 0's valid output was kept; stage 1's command ran again

    # a corrupt output of a stage recorded done is refused on resume, naming the tensor
    from safetensors.torch import load_file, save_file

    path = out_b / "external" / "stage1" / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    state_path = out_b / "state.json"
    state = json.loads(state_path.read_text())
    state["done"] = [d for d in state["done"] if d not in ("stage1/report", "final_hf")]
    state_path.write_text(json.dumps(state))
    rc, log = run_cli(["run", str(cfg_b)], timeout=600)
    assert rc == 2 and "non-finite" in log and name in log, log[-3000:]
