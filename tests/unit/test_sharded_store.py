"""The sharded feature store (scale-out scoring's output) and the per-row summary it is planned from."""

import json

import numpy as np
import pytest

from megatron_cropi.influence.feature_store import DONE, EXCLUDED, FLAGGED, PENDING, FeatureHeader, FeatureStoreMismatch
from megatron_cropi.influence.sharded_store import ShardedFeatureStore, is_sharded_store, load_feature_store
from megatron_cropi.popi.buckets import group_lengths, group_token_counts
from megatron_cropi.records import PromptRecord, Response, RolloutGroup, SamplingParams
from megatron_cropi.rollout.store import StoreHeader, TrajectoryStore


def _header(dtype="float32", n=10, k=6):
    return FeatureHeader(num_rows=n, k=k, seed=0, projector="p", param_set_hash="h", checkpoint_step=3,
                         prompt_id_hash="x", dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_units_from_several_writers_read_back_as_one_store(tmp_path, dtype):
    rng = np.random.default_rng(0)
    store = ShardedFeatureStore.open(tmp_path / "f", _header(dtype), excluded=np.array([0, 5]))
    feats = rng.normal(size=(10, 6)).astype(np.float32)
    store.write_unit(0, 0, [1, 2], feats[[1, 2]], [DONE, DONE])
    store.write_unit(1, 2, [6, 7, 8], feats[[6, 7, 8]], [DONE, FLAGGED, DONE])
    store.write_unit(0, 1, [3], feats[[3]], [DONE])
    again = load_feature_store(tmp_path / "f")
    assert isinstance(again, ShardedFeatureStore) and is_sharded_store(tmp_path / "f")
    assert again.done_units() == {0, 1, 2}
    expect = [EXCLUDED, DONE, DONE, DONE, PENDING, EXCLUDED, DONE, FLAGGED, DONE, PENDING]
    assert again.statuses().tolist() == expect and not again.complete
    assert again.counts() == {"pending": 2, "done": 5, "excluded": 2, "flagged": 1}
    tol = {"float32": 0, "float16": 2 ** -11, "bfloat16": 2 ** -8}[dtype]
    got = again.read_rows([8, 1, 4])
    np.testing.assert_allclose(got[:2], feats[[8, 1]], rtol=tol, atol=tol * np.abs(feats).max())
    assert not got[2].any()  # a pending row reads as zeros
    assert again.matrix().shape == (10, 6)


def test_reopen_checks_the_header_and_bad_units_are_refused(tmp_path):
    from megatron_cropi.influence.feature_store import FeatureStore

    ShardedFeatureStore.open(tmp_path / "f", _header(), plan_hash="abc")
    with pytest.raises(FeatureStoreMismatch, match="plan_hash='abc' .*, but this run has plan_hash='abd'"):
        ShardedFeatureStore.open(tmp_path / "f", _header(), plan_hash="abd")
    with pytest.raises(FeatureStoreMismatch, match="is a sharded feature store"):
        FeatureStore.load(tmp_path / "f")
    (tmp_path / "f" / "shards" / "stray.txt").write_text("x")  # a stray file is not a shard
    with pytest.raises(FeatureStoreMismatch, match="checkpoint_step=3, but this run has checkpoint_step=4"):
        ShardedFeatureStore.open(tmp_path / "f", FeatureHeader(**{**_header().__dict__, "checkpoint_step": 4}),
                                 plan_hash="abc")
    store = ShardedFeatureStore.load(tmp_path / "f")
    with pytest.raises(ValueError, match="unit 3: features \\(2, 5\\)"):
        store.write_unit(0, 3, [1, 2], np.zeros((2, 5)), [DONE, DONE])
    with pytest.raises(IndexError, match="outside \\[0, 10\\)"):
        store.write_unit(0, 3, [10], np.zeros((1, 6)), [DONE])
    assert store.done_units() == set()
    assert not list((tmp_path / "f" / "shards").rglob("*.tmp*"))
    header = json.loads((tmp_path / "f" / "header.json").read_text())
    assert header["sharded"] is True
    with pytest.raises(FileNotFoundError, match="no sharded feature store"):
        ShardedFeatureStore.load(tmp_path / "nowhere")


def test_row_summary_equals_the_groups_it_summarises(tmp_path):
    rng = np.random.default_rng(1)
    groups = []
    for i in range(11):
        resps = tuple(Response(rng.integers(1, 9, t).astype(np.int32), np.zeros(t, np.float32))
                      for t in rng.integers(1, 7, 4))
        rewards = np.zeros(4, np.float32) if i % 3 == 0 else np.array([1, 0, 0, 1][: 4], np.float32)
        if i == 4:
            rewards = np.array([1, 1, 1, 0], np.float32)  # equal over the first 3, not over all 4
        groups.append(RolloutGroup(PromptRecord(f"q{i:02d}", rng.integers(1, 9, int(rng.integers(2, 5))).astype(np.int32),
                                                ""), resps, rewards))
    store = TrajectoryStore.open_for_append(tmp_path / "s", StoreHeader.build(
        SamplingParams(n=4), tokenizer="t", model="m", policy_version=0, pool_hash="h", num_prompts=11))
    store.append(groups[5:])
    store.append(groups[:5])  # parts out of prompt-id order
    store.mark_complete()
    read = TrajectoryStore.open(tmp_path / "s", verify=False)
    for cap in (0, 3):
        capped = [RolloutGroup(g.prompt, g.responses[:cap or 4], g.rewards[:cap or 4]) for g in groups]
        summary = read.row_summary(cap)
        assert summary["longest"].tolist() == group_lengths(capped).tolist()
        assert summary["tokens"].tolist() == group_token_counts(capped).tolist()
        assert summary["zero_variance"].tolist() == [g.zero_variance for g in capped]
    assert read.row_summary(3)["zero_variance"][4] and not read.row_summary(0)["zero_variance"][4]


def test_scale_out_refuses_what_would_gather_the_pool():
    from megatron_cropi.config.loader import ConfigError, from_dict
    from megatron_cropi.run_config import RunConfig

    with pytest.raises(ConfigError, match=r"scoring.scale_out: true with scoring.shortlist"):
        from_dict(RunConfig, {"scoring": {"scale_out": True, "shortlist": {"fraction": 0.5}}})
    with pytest.raises(ConfigError, match=r"scoring.scale_out: true with selection.guard.source pool"):
        from_dict(RunConfig, {"scoring": {"scale_out": True}, "selection": {"guard": {"source": "pool"}}})
    from_dict(RunConfig, {"scoring": {"scale_out": True}, "selection": {"guard": {"source": "check"}}})


@pytest.mark.parametrize("use_sign", [False, True])
@pytest.mark.parametrize("guard", ["none", "check"])
def test_selection_from_cosines_equals_selection_from_features(guard, use_sign):
    """What rank 0 selects from the gathered cosines (scale-out) is what it selects from the features."""
    from megatron_cropi.selection.guard import GuardConfig
    from megatron_cropi.selection.policies import SelectionConfig, SelectionInputs, pool_directions, ranking_scores, select
    from megatron_cropi.selection.scores import cosine_scores

    rng = np.random.default_rng(3)
    n, k = 60, 16
    feats = rng.normal(size=(n, k))
    usable = rng.random(n) > 0.2
    targets = {name: (rng.normal(size=(9, k)) + 0.5, rng.random(9) > 0.3) for name in ("a", "b")}
    guard_set = (rng.normal(size=(7, k)), np.ones(7, bool))
    cfg = SelectionConfig(policy="cropi", ratio=0.2, guard=GuardConfig(source=guard, mode="demote", threshold=0.1),
                          use_sign=use_sign)
    common = dict(prompt_ids=[f"p{i}" for i in range(n)], pass_rates=rng.random(n), sources=["s"] * n,
                  targets=targets, guard=guard_set if guard == "check" else None)
    by_features = SelectionInputs(features=feats, usable=usable, **common)
    directions = pool_directions(cfg, targets, common["guard"], seed=5)
    assert sorted(directions) == (["guard"] if guard == "check" else []) + ["target:a", "target:b"]
    # as scale_out_cosines takes them: the targets' with selection.use_sign, the guard's plain
    by_cosines = SelectionInputs(usable=usable, cosines={name: cosine_scores(feats, usable, d,
                                                                             use_sign=use_sign and name != "guard")
                                                          for name, d in directions.items()}, **common)
    a, b = select(cfg, by_features, stage=1, seed=5), select(cfg, by_cosines, stage=1, seed=5)
    assert a.prompt_ids == b.prompt_ids and a.scores == b.scores and a.summary == b.summary
    np.testing.assert_array_equal(ranking_scores(cfg, by_features, seed=5), ranking_scores(cfg, by_cosines, seed=5))
