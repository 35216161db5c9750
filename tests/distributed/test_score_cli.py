"""`cropi score`: a killed run resumes without recomputing done rows and ends identical; DP=2 agrees.

The trajectory store is a fixture (random responses and rewards with signal) written through the real
``TrajectoryStore``; the policy is the seeded random initialisation of the tiny model.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

K, N = 4, 24


def _store(out: Path, vocab: int):
    from megatron_cropi.rollout.store import StoreHeader, TrajectoryStore
    from megatron_cropi.records import PromptRecord, Response, RolloutGroup, SamplingParams

    rng = np.random.default_rng(0)
    groups = []
    for i in range(N):
        prompt = PromptRecord(f"p{i:03d}", rng.integers(2, vocab, 6).astype(np.int32), answer="1", source="fx")
        resps = tuple(Response(rng.integers(2, vocab, 4).astype(np.int32), (-rng.uniform(2, 4, 4)).astype(np.float32))
                      for _ in range(K))
        rewards = rng.integers(0, 2, K).astype(np.float32) if i % 4 else np.zeros(K, np.float32)
        groups.append(RolloutGroup(prompt, resps, rewards))
    sampling = SamplingParams(n=K, temperature=1.0, max_tokens=4)
    store = TrajectoryStore.open_for_append(out / "rollouts" / "pool", StoreHeader.build(
        sampling, tokenizer="fixture", model="fixture", policy_version=0, pool_hash="fixture", num_prompts=N))
    store.append(groups)
    store.mark_complete()


def _config(tmp: Path, out: Path) -> Path:
    cfg = {"run": {"output_dir": str(out), "seed": 7, "num_threads": 1}, "model": {"preset": "tiny"},
           "rollout": {"progress": False}, "projection": {"kind": "sjlt", "k": 256, "keep_ratio": 0.5},
           "scoring": {"prompts_per_microbatch": 2, "microbatches_per_call": 2}}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args, fault=None, nproc=1):
    from megatron_cropi.testing.cli import run_cli

    return run_cli(args, fault=fault, nproc=nproc)


def _features(out: Path):
    from megatron_cropi.influence.feature_store import FeatureStore

    fs = FeatureStore.load(out / "features" / "step0" / "pool")
    return fs.matrix().copy(), fs.statuses().copy()


@pytest.mark.timeout(600)
def test_score_cli_resume_and_data_parallel(tmp_path):
    from megatron_cropi.model.config import MODEL_PRESETS

    vocab = MODEL_PRESETS["tiny"][0]["vocab_size"]
    runs = {}
    for name in ("a", "b", "dp"):
        (tmp_path / name).mkdir()
        _store(tmp_path / name, vocab)
        runs[name] = _config(tmp_path, tmp_path / name)
    rc, log = _run(["score", str(runs["a"])])
    assert rc == 0, log[-3000:]
    ref, ref_status = _features(tmp_path / "a")
    assert (ref_status[::4] == 2).all() and (ref_status[1::4] == 1).all()  # zero-variance rows excluded
    assert np.all(ref[::4] == 0) and np.all(np.abs(ref[1::4]).sum(1) > 0)

    rc, log = _run(["score", str(runs["b"])], fault="score:chunk")  # dies after the first written chunk
    assert rc == 17, log[-3000:]
    _, partial = _features(tmp_path / "b")
    assert 0 < (partial == 1).sum() < (ref_status == 1).sum()
    rc, log = _run(["score", str(runs["b"])])
    assert rc == 0, log[-3000:]
    stats = json.loads(log.strip().splitlines()[-1])["pool"]
    assert stats["skipped_done"] == (partial == 1).sum()  # done rows were not recomputed
    got, status = _features(tmp_path / "b")
    assert np.array_equal(status, ref_status) and np.array_equal(got, ref)

    rc, log = _run(["score", str(runs["dp"])], nproc=2)  # DP=2: disjoint prompt shards, rows gathered
    assert rc == 0, log[-3000:]
    dp, dp_status = _features(tmp_path / "dp")
    assert np.array_equal(dp_status, ref_status)
    live = ref_status == 1
    err = np.linalg.norm(dp[live] - ref[live], axis=1) / np.linalg.norm(ref[live], axis=1)
    assert err.max() < 1e-4
