"""Selection policies and influence scores."""

import numpy as np
import pytest

from megatron_cropi.config.loader import ConfigError
from megatron_cropi.selection.policies import SelectionConfig, SelectionError, SelectionInputs, select
from megatron_cropi.selection.scores import cosine_scores, fuse_max, fuse_reciprocal_rank, target_direction


def _inputs(n=20, k=8, seed=0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=k)
    feats = rng.normal(size=(n, k))
    feats[:3] = direction * np.array([[3.0], [2.0], [1.0]]) + 0.01 * rng.normal(size=(3, k))  # aligned rows
    usable = np.ones(n, bool)
    usable[5] = False
    feats[5] = 0
    target = direction + 0.05 * rng.normal(size=(6, k))
    return SelectionInputs(prompt_ids=[f"p{i}" for i in range(n)], pass_rates=rng.uniform(size=n),
                           sources=["a" if i % 2 else "b" for i in range(n)], features=feats, usable=usable,
                           targets={"t": (target, np.ones(6, bool))})


def test_cosine_and_target_direction():
    f = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    usable = np.array([True, True, True, False])
    d, chosen = target_direction(f, usable, max_prompts=2, seed=0)
    assert chosen.size == 2 and set(chosen) <= {0, 1, 2}
    s = cosine_scores(f, usable, np.array([1.0, 0.0]))
    assert np.allclose(s[:3], [1.0, 0.0, 1 / np.sqrt(2)]) and s[3] == -np.inf
    assert np.allclose(cosine_scores(f, usable, np.array([2.0, -0.1]), use_sign=True)[:3], [1 / np.sqrt(2), -1 / np.sqrt(2), 0.0])
    with pytest.raises(ValueError, match="no prompt with a gradient"):
        target_direction(f, np.zeros(4, bool))


@pytest.mark.parametrize("use_sign", [False, True])
def test_cosine_scores_over_many_chunks_equal_a_row_by_row_oracle(use_sign):
    # more rows than one block, float32 input, unusable rows, a usable all-zero row and a usable NaN row
    from megatron_cropi.selection.scores import COSINE_CHUNK_ROWS

    rng = np.random.default_rng(3)
    n, k = 2 * COSINE_CHUNK_ROWS + 37, 24
    f = rng.normal(size=(n, k)).astype(np.float32)
    usable = rng.uniform(size=n) > 0.3
    f[7] = 0.0
    f[300, 4] = np.nan
    usable[[7, 300]] = True
    d = rng.normal(size=k)
    got = cosine_scores(f, usable, d, use_sign=use_sign)
    for i in range(n):
        row = np.sign(f[i].astype(np.float64)) if use_sign else f[i].astype(np.float64)
        dd = np.sign(d) if use_sign else d
        norm = np.sqrt(sum(x * x for x in row))
        if not usable[i] or not norm > 0:  # NaN norms too
            assert got[i] == -np.inf, i
        else:
            assert got[i] == pytest.approx(sum(a * b for a, b in zip(row, dd)) / (norm * np.sqrt(sum(x * x for x in dd))),
                                           rel=1e-12), i


def test_pool_cosine_computed_once_per_direction():
    inp = _inputs()
    d = np.ones(8)
    first = inp.pool_cosine("target:t", d, False)
    assert inp.pool_cosine("target:t", d, False) is first  # the ranking asks again: no second pass
    assert inp.pool_cosine("target:t", d, True) is not first
    with pytest.raises(ValueError):
        first[0] = 1.0  # shared with every later caller: read-only
    inp.features, inp.usable = inp.features[::-1].copy(), inp.usable[::-1].copy()  # new ones: computed again
    np.testing.assert_array_equal(inp.pool_cosine("target:t", d, False), first[::-1])
    assert not np.array_equal(inp.pool_cosine("target:t", 2 * d - np.arange(8), False), first)
    with pytest.raises(ValueError, match="one flag per row"):
        cosine_scores(inp.features, inp.usable[:-1], d)


def test_target_direction_is_the_mean_of_the_chosen_usable_rows():
    # rows 1 and 4 are unusable and large: any leak of them into the mean is visible
    f = np.array([[1.0, 2.0, 3.0],
                  [100.0, 100.0, 100.0],
                  [3.0, 0.0, -3.0],
                  [5.0, 4.0, 6.0],
                  [-100.0, 50.0, 7.0]], dtype=np.float32)
    usable = np.array([True, False, True, True, False])
    # every usable row fits under max_prompts: the direction is their mean, by hand [1+3+5, 2+0+4, 3-3+6] / 3
    d, chosen = target_direction(f, usable, max_prompts=10, seed=0)
    assert chosen.tolist() == [0, 2, 3]
    assert d.dtype == np.float64 and d.shape == (3,)
    assert np.allclose(d, [3.0, 2.0, 2.0], rtol=0, atol=1e-12)
    # max_prompts subsampling: distinct usable rows, and the direction is exactly their plain numpy mean
    seen = set()
    for seed in range(20):
        d2, chosen2 = target_direction(f, usable, max_prompts=2, seed=seed)
        rows = chosen2.tolist()
        assert len(rows) == 2 and len(set(rows)) == 2 and set(rows) <= {0, 2, 3}
        expect = (f[rows[0]].astype(np.float64) + f[rows[1]].astype(np.float64)) / 2
        assert np.allclose(d2, expect, rtol=0, atol=1e-12)
        seen.add(tuple(sorted(rows)))
    assert len(seen) > 1  # the seed changes the subsample
    # a single usable row: the direction is that row
    d1, c1 = target_direction(f, np.array([False, False, False, True, False]), max_prompts=5, seed=3)
    assert c1.tolist() == [3] and np.allclose(d1, [5.0, 4.0, 6.0], rtol=0, atol=1e-12)


def test_fusions_hand_computed():
    a = np.array([0.9, 0.8, 0.1, -np.inf])
    b = np.array([0.1, 0.7, 0.9, -np.inf])
    rr = fuse_reciprocal_rank([a, b], m=2)  # a: 0→1, 1→1/2 ; b: 2→1, 1→1/2
    assert np.allclose(rr[:3], [1.0, 1.0, 1.0]) and rr[3] == -np.inf
    assert np.allclose(fuse_max([a, b])[:3], [0.9, 0.8, 0.9])


def test_cropi_picks_the_aligned_prompts_best_first():
    sel = select(SelectionConfig(ratio=0.15), _inputs(), stage=0, seed=1)
    assert sorted(sel.rows) == [0, 1, 2]  # int(0.15 × 20) = 3: the rows aligned with the target
    assert sel.scores[0] >= sel.scores[1] >= sel.scores[2] > 0.9
    assert sel.summary["zero_gradient_prompts"] == 1 and sel.summary["selected"] == 3
    assert sum(sel.summary["source_mix"].values()) == 3


def test_exclude_previous_and_determinism():
    inp = _inputs()
    inp.previous = {"p0"}
    a = select(SelectionConfig(ratio=0.15, exclude_previous=True), inp, stage=1, seed=1)
    assert "p0" not in a.prompt_ids
    b = select(SelectionConfig(ratio=0.15, exclude_previous=False), inp, stage=1, seed=1)
    assert "p0" in b.prompt_ids and b.summary["previous_overlap"] == 1
    r1 = select(SelectionConfig(policy="random", ratio=0.25), inp, stage=2, seed=3)
    r2 = select(SelectionConfig(policy="random", ratio=0.25), inp, stage=2, seed=3)
    r3 = select(SelectionConfig(policy="random", ratio=0.25), inp, stage=3, seed=3)
    assert r1.rows == r2.rows and r1.rows != r3.rows and len(r1.rows) == 5


def test_baselines():
    inp = _inputs()
    inp.pass_rates = np.linspace(0, 1, 20)
    learn = select(SelectionConfig(policy="learnability", ratio=0.1), inp, stage=0, seed=0)
    assert set(learn.rows) == {9, 10}  # p closest to 0.5
    band = select(SelectionConfig(policy="pass_rate_band", ratio=0.5, pass_rate_band=(0.3, 0.6)), inp, stage=0, seed=0)
    assert all(0.3 <= inp.pass_rates[i] <= 0.6 for i in band.rows)
    full = select(SelectionConfig(policy="full"), inp, stage=0, seed=0)
    assert full.rows == list(range(20))


def test_bad_inputs():
    inp = _inputs()
    with pytest.raises(SelectionError, match="pool is empty"):
        select(SelectionConfig(), SelectionInputs([], np.zeros(0), []), stage=0, seed=0)
    with pytest.raises(SelectionError, match="selects no prompt from a pool of 20"):
        select(SelectionConfig(ratio=0.01), inp, stage=0, seed=0)
    no_target = _inputs()
    no_target.targets = {}
    with pytest.raises(SelectionError, match="target set"):
        select(SelectionConfig(), no_target, stage=0, seed=0)
    dead_target = _inputs()
    dead_target.targets = {"t": (np.zeros((3, 8)), np.zeros(3, bool))}
    sel = select(SelectionConfig(ratio=0.1), dead_target, stage=0, seed=0)
    assert sel.policy == "learnability" and "no target set had a prompt with a gradient" in sel.summary["fallback"]
    assert "t" in sel.summary["skipped_targets"]
    with pytest.raises(ConfigError, match="ratio"):
        SelectionConfig(ratio=0.0)
    with pytest.raises(ConfigError, match="pass_rate_band"):
        SelectionConfig(pass_rate_band=(0.9, 0.1))


def test_every_prompt_zero_variance_uses_fallback_and_says_so():
    inp = _inputs()
    inp.usable = np.zeros(20, bool)
    sel = select(SelectionConfig(ratio=0.1, fallback="random"), inp, stage=0, seed=0)
    assert sel.policy == "random" and len(sel.rows) == 2
    assert "no pool prompt had a gradient" in sel.summary["fallback"]
    with pytest.raises(SelectionError, match="fallback"):
        select(SelectionConfig(ratio=0.1, fallback="error"), inp, stage=0, seed=0)
