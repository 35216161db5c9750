"""The guard set (``selection.guard``): conflicting candidates are dropped or demoted; all-conflict says so."""

import numpy as np
import pytest

from megatron_cropi.config.loader import ConfigError
from megatron_cropi.selection.guard import GuardConfig
from megatron_cropi.selection.policies import SelectionConfig, SelectionError, SelectionInputs, select


def _inputs(guard=None):
    """10 pool prompts in 2-D: x is the target's axis (target direction e_x), y the guard's. Rows 0-4 have
    y > 0 (they agree with a guard along e_y), rows 5-9 have y < 0 (they conflict with it)."""
    xs = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 1.0, 0.9, 0.8, 0.7, 0.6])
    ys = np.array([0.3, 0.2, 0.4, 0.1, 0.5, -0.05, -0.2, -0.1, -0.3, -0.4])
    feats = np.stack([xs, ys], 1)
    n = len(xs)
    return SelectionInputs(prompt_ids=[f"p{i}" for i in range(n)], pass_rates=np.full(n, 0.5), sources=["s"] * n,
                           features=feats, usable=np.ones(n, bool),
                           targets={"t": (np.array([[1.0, 0.0], [1.0, 0.0]]), np.ones(2, bool))}, guard=guard)


def _by_hand_target_order(feats, rows):
    """Oracle: rows ordered by cos(f, e_x) = x / |f|, descending (plain Python)."""
    cos = {int(i): feats[i, 0] / float(np.hypot(*feats[i])) for i in rows}
    return sorted(cos, key=lambda i: -cos[i])


def test_guard_check_drops_the_conflicting_prompts():
    inp = _inputs(guard=(np.array([[0.0, 1.0], [0.0, 2.0]]), np.ones(2, bool)))  # guard direction e_y
    cfg = SelectionConfig(ratio=0.4, guard=GuardConfig(source="check"))
    sel = select(cfg, inp, stage=0, seed=0)
    agree = [i for i in range(10) if inp.features[i, 1] > 0]
    assert sel.rows == _by_hand_target_order(inp.features, agree)[:4]
    assert sel.summary["guard"]["conflicting"] == 5 and sel.summary["guard"]["dropped"] == 5
    # without a guard the conflicting row 5 (x = 1, y = -0.05, the best cosine) is picked first
    plain = select(SelectionConfig(ratio=0.4), inp, stage=0, seed=0)
    assert plain.rows == _by_hand_target_order(inp.features, range(10))[:4] and plain.rows[0] == 5
    assert "guard" not in plain.summary


def test_guard_demote_ranks_conflicting_prompts_last():
    inp = _inputs(guard=(np.array([[0.0, 1.0]]), np.ones(1, bool)))
    sel = select(SelectionConfig(ratio=0.7, guard=GuardConfig(source="check", mode="demote")), inp, stage=0, seed=0)
    agree = _by_hand_target_order(inp.features, range(5))
    conflict = _by_hand_target_order(inp.features, range(5, 10))
    assert sel.rows == (agree + conflict)[:7]
    assert sel.summary["guard"]["demoted_selected"] == 2


def test_guard_pool_uses_the_pool_mean_gradient():
    inp = _inputs()
    # oracle: cosines with the pool's plain mean; a threshold that puts exactly 3 rows under it
    mean = inp.features.mean(0)
    cos = inp.features @ mean / (np.linalg.norm(inp.features, axis=1) * np.linalg.norm(mean))
    thr = float(np.sort(cos)[3])  # the 3 lowest fall under the threshold
    sel = select(SelectionConfig(ratio=0.5, guard=GuardConfig(source="pool", threshold=thr)), inp, stage=0, seed=0)
    kept = [i for i in range(10) if cos[i] >= thr]
    assert sel.summary["guard"]["conflicting"] == 3
    assert sel.rows == _by_hand_target_order(inp.features, kept)[:5]


def test_a_guard_that_conflicts_with_everything_selects_nothing_and_says_so():
    inp = _inputs(guard=(np.array([[-1.0, 0.0]]), np.ones(1, bool)))  # against every row's x > 0
    with pytest.raises(SelectionError, match="every one of the 10 candidates conflicts with the guard set; "
                                             "nothing selected"):
        select(SelectionConfig(guard=GuardConfig(source="check")), inp, stage=0, seed=0)


def test_guard_errors_name_what_is_missing():
    with pytest.raises(SelectionError, match="check set's features are missing"):
        select(SelectionConfig(guard=GuardConfig(source="check")), _inputs(), stage=0, seed=0)
    with pytest.raises(SelectionError, match="selection.guard .*no prompt with a gradient"):
        select(SelectionConfig(guard=GuardConfig(source="check")),
               _inputs(guard=(np.zeros((2, 2)), np.zeros(2, bool))), stage=0, seed=0)
    with pytest.raises(ConfigError, match="mode"):
        GuardConfig(mode="skip")


def test_keys_the_policy_ignores_are_refused_by_name():
    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.run_config import RunConfig

    with pytest.raises(ConfigError, match=r"selection.guard.source: pool: the guard applies to selection.policy "
                                          r"cropi only, not random"):
        from_dict(RunConfig, {"selection": {"policy": "random", "guard": {"source": "pool"}}})
    with pytest.raises(ConfigError, match=r"curriculum.refresh_behaviour_every: 2: selection.policy full uses no "
                                          r"behaviour rollouts"):
        from_dict(RunConfig, {"selection": {"policy": "full"}, "curriculum": {"refresh_behaviour_every": 2}})
    from_dict(RunConfig, {"selection": {"guard": {"source": "pool"}}, "curriculum": {"refresh_behaviour_every": 2}})
