"""The distributed top-m and quantiles (selection/distributed.py) in one process, against numpy's sort.

The oracle is :func:`~megatron_cropi.selection.scores.top_m` (a stable argsort) and ``np.quantile``;
over several ranks the same laws are checked in ``tests/distributed/test_scaled_selection.py``.
"""

import numpy as np
import pytest

from megatron_cropi.selection.distributed import (
    distributed_quantiles,
    distributed_top_m,
    key_values,
    kth_largest_keys,
    order_keys,
)
from megatron_cropi.selection.scores import top_m


def _scores(rng, n, ties):
    values = rng.normal(size=n)
    if ties:  # few distinct values: ties at the threshold are the rule
        values = np.round(values * 2) / 2
    values[rng.random(n) < 0.2] = -np.inf
    return values


def test_order_keys_follow_the_float_order_and_invert():
    values = np.array([-np.inf, -1e300, -2.5, -1e-310, -0.0, 0.0, 1e-310, 3.0, 1e300, np.inf])
    keys = order_keys(values)
    assert np.all(np.diff(keys.astype(object)) >= 0)
    assert keys[4] == keys[5]  # -0.0 is 0.0
    assert np.array_equal(key_values(keys)[5:], values[5:]) and np.array_equal(key_values(keys)[:4], values[:4])
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000) * 10.0 ** rng.integers(-30, 30, 2000)
    order = np.argsort(x, kind="stable")
    assert np.array_equal(np.argsort(order_keys(x), kind="stable"), order)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m", [1, 7, 60, 500])
def test_top_m_is_the_stable_sort_top_m(ties, m):
    rng = np.random.default_rng(m + 100 * ties)
    scores = _scores(rng, 300, ties)
    rows = np.arange(300)
    perm = rng.permutation(300)  # the rows in any order on the rank
    picked = distributed_top_m(scores[perm], rows[perm], m)
    assert set(rows[perm][picked].tolist()) == set(top_m(scores, m).tolist())


def test_kth_largest_keys_and_quantiles_match_numpy():
    rng = np.random.default_rng(3)
    for ties in (False, True):
        scores = _scores(rng, 257, ties)
        finite = np.sort(scores[np.isfinite(scores)])[::-1]
        ks = [1, 2, 50, finite.size]
        assert list(key_values(kth_largest_keys(order_keys(finite), ks))) == [finite[k - 1] for k in ks]
        qs = (0.0, 0.25, 0.5, 0.9, 1.0)
        assert distributed_quantiles(scores, qs) == pytest.approx([np.quantile(finite, q) for q in qs], rel=0, abs=0)
    assert distributed_quantiles(np.full(4, -np.inf), (0.5,)) is None


def test_nothing_finite_selects_nothing():
    assert not distributed_top_m(np.full(5, -np.inf), np.arange(5), 3).any()
    assert distributed_top_m(np.array([1.0, -np.inf, 2.0]), np.arange(3), 10).tolist() == [True, False, True]
