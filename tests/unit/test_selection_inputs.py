"""What a selection reads of the pool's trajectory store (``curriculum.steps.selection_inputs``): ids,
pass rates and sources read column-wise equal the same figures computed by hand from the groups written,
prompts the store does not hold follow with pass rate NaN, and an interrupted store is refused."""

import numpy as np
import pytest

from megatron_cropi.curriculum.steps import selection_inputs
from megatron_cropi.data.prompt_ids import pool_hash, prompt_id
from megatron_cropi.records import PromptRecord, Response, RolloutGroup, SamplingParams
from megatron_cropi.rollout.store import StoreHeader, TrajectoryStore


def _groups(n: int, seed: int = 0) -> list[RolloutGroup]:
    """Groups of 1-5 responses whose rewards include the 0.5 boundary (not a pass) and partial credit."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text, answer = f"q{i}", str(i)
        prompt = PromptRecord(prompt_id(text, answer), rng.integers(0, 30, 4).astype(np.int32), answer,
                              source=f"fam{i % 3}", text=text)
        k = 1 + i % 5
        responses = tuple(Response(rng.integers(0, 30, 2).astype(np.int32), np.zeros(2, np.float32), finished=True)
                          for _ in range(k))
        rewards = rng.choice([0.0, 0.5, 0.75, 1.0], size=k).astype(np.float32)
        out.append(RolloutGroup(prompt, responses, rewards, policy_version=0))
    return out


def _write(path, groups, *, complete=True, part=7):
    header = StoreHeader.build(SamplingParams(n=5, temperature=1.0), tokenizer="char:test", model="hf:test:abc",
                               policy_version=0, pool_hash=pool_hash(g.prompt_id for g in groups),
                               num_prompts=len(groups))
    store = TrajectoryStore.open_for_append(path, header)
    for start in range(0, len(groups), part):  # several parts, rows out of prompt-id order within each
        store.append(groups[start:start + part])
    if complete:
        store.mark_complete()


def test_pass_rates_and_sources_read_column_wise_equal_the_groups(tmp_path):
    groups = _groups(23)
    _write(tmp_path / "pool", groups)
    extra = [PromptRecord(prompt_id(f"x{i}", "0"), np.zeros(3, np.int32), "0", source="famx", text=f"x{i}")
             for i in range(4)]
    inputs = selection_inputs([g.prompt for g in groups] + extra,
                              pool_rollouts=tmp_path / "pool", features={}, previous={"p"})
    held = sorted(groups, key=lambda g: g.prompt_id)  # the store's row order: prompt-id order
    rest = sorted(extra, key=lambda p: p.prompt_id)
    assert list(inputs.prompt_ids) == [g.prompt_id for g in held] + [p.prompt_id for p in rest]
    assert list(inputs.sources) == [g.prompt.source for g in held] + ["famx"] * 4
    by_hand = [sum(r > 0.5 for r in g.rewards.tolist()) / len(g.rewards) for g in held]
    np.testing.assert_allclose(inputs.pass_rates[:23], by_hand, rtol=0, atol=1e-12)
    assert np.isnan(inputs.pass_rates[23:]).all() and inputs.previous == {"p"}


def test_a_store_holding_the_whole_pool_gives_the_same_columns_without_lists(tmp_path):
    from megatron_cropi.rollout.row_index import CodedStrings, IdView

    groups = _groups(23, seed=1)
    _write(tmp_path / "pool", groups)
    inputs = selection_inputs([g.prompt for g in groups], pool_rollouts=tmp_path / "pool", features={}, previous=set())
    held = sorted(groups, key=lambda g: g.prompt_id)
    assert isinstance(inputs.prompt_ids, IdView) and isinstance(inputs.sources, CodedStrings)
    assert list(inputs.prompt_ids) == [g.prompt_id for g in held] and len(inputs.prompt_ids) == 23
    assert [inputs.prompt_ids[i] for i in (0, 22)] == [held[0].prompt_id, held[22].prompt_id]
    assert list(inputs.sources) == [g.prompt.source for g in held] and inputs.sources[5] == held[5].prompt.source
    by_hand = [sum(r > 0.5 for r in g.rewards.tolist()) / len(g.rewards) for g in held]
    np.testing.assert_allclose(inputs.pass_rates, by_hand, rtol=0, atol=1e-12)


def test_row_summary_counts_each_rows_first_responses_as_a_loop_over_the_groups_does(tmp_path):
    from megatron_cropi.records import PromptRecord, Response, RolloutGroup

    rng = np.random.default_rng(3)
    groups = []
    for i in range(31):  # 0 to 5 responses of 0 to 6 tokens, rewards equal or not
        k = i % 6
        responses = tuple(Response(rng.integers(1, 30, int(rng.integers(0, 7))).astype(np.int32),
                                   np.zeros(0, np.float32)) for _ in range(k))
        responses = tuple(Response(r.token_ids, np.zeros(len(r.token_ids), np.float32)) for r in responses)
        rewards = (np.full(k, 1.0) if i % 4 == 0 else rng.choice([0.0, 1.0], k)).astype(np.float32)
        prompt = PromptRecord(prompt_id(f"r{i}", "0"), rng.integers(1, 30, 1 + i % 4).astype(np.int32), "0",
                              source="f", text=f"r{i}")
        groups.append(RolloutGroup(prompt, responses, rewards, policy_version=0))
    _write(tmp_path / "pool", groups, part=5)
    store = TrajectoryStore.open(tmp_path / "pool")
    held = sorted(groups, key=lambda g: g.prompt_id)
    for cap in (0, 1, 2, 4):
        got = store.row_summary(cap)
        for row, g in enumerate(held):
            k = min(len(g.responses), cap) if cap else len(g.responses)
            lens = [len(r.token_ids) for r in g.responses[:k]]
            assert got["longest"][row] == len(g.prompt.token_ids) + max(lens, default=0), (cap, row)
            assert got["tokens"][row] == k * len(g.prompt.token_ids) + sum(lens), (cap, row)
            assert got["zero_variance"][row] == (k == 0 or len(set(g.rewards[:k].tolist())) == 1), (cap, row)


def test_an_interrupted_pool_store_is_refused_by_path(tmp_path):
    groups = _groups(9)
    _write(tmp_path / "pool", groups, complete=False)
    with pytest.raises(RuntimeError, match=r"pool is not complete; rerun to finish its rollouts"):
        selection_inputs([g.prompt for g in groups], pool_rollouts=tmp_path / "pool", features={}, previous=set())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_usable_rows_are_the_done_rows_that_are_not_all_zero(tmp_path, dtype):
    from megatron_cropi.curriculum.steps import _usable
    from megatron_cropi.influence.feature_store import DONE, EXCLUDED, FLAGGED, FeatureHeader, FeatureStore

    n, k = 600, 16  # more rows than one block of the check
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, k)).astype(np.float32)
    status = np.full(n, DONE, np.uint8)
    status[::7] = EXCLUDED
    status[3::11] = FLAGGED
    x[[5, 300, 599]] = 0.0  # done, but no gradient (rows not done keep nonzero features: their status decides)
    x[9, 2] = np.nan  # done, but not finite
    header = FeatureHeader(num_rows=n, k=k, seed=0, projector="sjlt", param_set_hash="h", checkpoint_step=0,
                           prompt_id_hash="p", dtype=dtype)
    FeatureStore.open(tmp_path / "s", header).write_rows(np.arange(n), x, status)
    features, usable = _usable(FeatureStore.load(tmp_path / "s"))
    by_hand = [status[i] == DONE and not any(np.isnan(v) for v in x[i]) and any(v != 0 for v in x[i])
               for i in range(n)]
    assert usable.tolist() == by_hand and features.shape == (n, k)
