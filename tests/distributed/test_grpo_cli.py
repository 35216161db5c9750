"""``cropi train CONFIG`` end to end in its own process: the synthetic suite with the exact verifier,
the native sampler, evaluation, TensorBoard, checkpoints; a second call resumes and only adds steps."""

import json
import os
import subprocess
import sys

import pytest

CONFIG = """
run: {{output_dir: {out}, seed: 7, num_threads: 1}}
model: {{preset: cpu-default}}
data:
  kind: synthetic
  synthetic: {{seed: 0, per_family: 2, val_size: 2, test_size: 4, check_per_family: 1}}
rollout: {{engine: native, n: 4, temperature: 1.0, max_tokens: 6}}
grpo:
  steps: 2
  prompts_per_step: 4
  micro_batch_prompts: 4
  eval_interval: 2
  eval_samples: 2
  optim: {{lr: 3.0e-4}}
  checkpoint: {{save_interval: 1, keep_last: 1}}
"""


def _cropi(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "megatron_cropi.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=240)


@pytest.mark.timeout(300)
def test_cropi_train_runs_and_resumes(tmp_path):
    from megatron_cropi.metrics import read_scalars

    cfg = tmp_path / "train.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "run"))
    first = _cropi(str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    assert summary["steps"] == 2 and summary["checkpoint"].endswith("step_00000002")
    out = tmp_path / "run" / "train"
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]  # keep_last: 1
    assert [h["step"] for h in json.loads((out / "eval.json").read_text())] == [0, 2]
    assert "train/reward" in read_scalars(out / "tensorboard") and "eval/pass_rate" in read_scalars(out / "tensorboard")

    second = _cropi(str(cfg), "--steps", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and json.loads(second.stdout[second.stdout.index("{"):])["steps"] == 3



def test_cropi_train_rejects_a_bad_config_before_starting(tmp_path, capsys):
    from megatron_cropi.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.format(out=tmp_path / "run").replace("prompts_per_step: 4", "prompts_per_step: 0"))
    assert main(["train", str(bad)]) == 2  # the config is checked in-process, before any process group exists
    assert "grpo.prompts_per_step: must be >= 1, got 0" in capsys.readouterr().err
