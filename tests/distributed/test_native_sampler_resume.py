"""`cropi rollout` killed mid-run (SIGKILL) resumes at the first unfinished prompt, and the finished
store equals an uninterrupted run's, group for group."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_cropi.testing.spawn import run_ranks

CONFIG = """
run: {{output_dir: {out}, seed: 3}}
model: {{preset: cpu-default}}
data:
  kind: synthetic
  synthetic: {{per_family: 16, val_size: 4, test_size: 4, check_per_family: 0}}
rollout: {{n: 8, batch_prompts: 4, max_batch_sequences: 32, progress: false}}
"""
LIMIT = 160


def _finish_and_reference(config_path, killed_store, fresh_store):
    from megatron_cropi.run_config import load_run_config
    from megatron_cropi.commands.rollout import run_rollout

    cfg = load_run_config(config_path)
    resumed = run_rollout(cfg, store_dir=killed_store, limit=LIMIT)
    fresh = run_rollout(cfg, store_dir=fresh_store, limit=LIMIT)
    return resumed, fresh


@pytest.mark.timeout(240)
def test_killed_cli_rollout_resumes_to_the_uninterrupted_store(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(out=tmp_path / "out"))
    store = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_cropi.cli", "rollout", str(config), "--store", str(store),
                             "--limit", str(LIMIT)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        manifest = store / "manifest.json"
        if manifest.exists():
            try:
                committed = len(json.loads(manifest.read_text())["parts"])
            except json.JSONDecodeError:  # never happens with atomic replaces; tolerate anyway
                committed = 0
            if committed >= 2:
                break
        time.sleep(0.005)
    assert proc.poll() is None, f"rollout ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from megatron_cropi.rollout.store import TrajectoryStore

    partial = TrajectoryStore.open(store)
    assert 8 <= len(partial) < LIMIT and not partial.complete
    done_before = len(partial)

    resumed, fresh = run_ranks(_finish_and_reference, 1, args=(str(config), str(store), str(tmp_path / "fresh")),
                               timeout_s=200)[0]
    assert resumed.prompts_already_done == done_before and resumed.prompts_rolled_out == LIMIT - done_before
    assert resumed.complete and fresh.complete and fresh.prompts_rolled_out == LIMIT
    a, b = TrajectoryStore.open(store), TrajectoryStore.open(tmp_path / "fresh")
    assert a.header.to_dict() == b.header.to_dict() and len(a) == len(b) == LIMIT
    for ga, gb in zip(a.iter_groups(), b.iter_groups(), strict=True):
        assert ga.prompt_id == gb.prompt_id and ga.rewards.tolist() == gb.rewards.tolist()
        for ra, rb in zip(ga.responses, gb.responses, strict=True):
            assert ra.token_ids.tolist() == rb.token_ids.tolist() and ra.finished == rb.finished
            np.testing.assert_allclose(ra.logprobs, rb.logprobs, atol=1e-6)
    assert not any(p.name.startswith(".") for p in Path(store, "parts").iterdir())
