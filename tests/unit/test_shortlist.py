"""The pool shortlist (``scoring.shortlist``): which live rows a stage scores, and the carried ranking."""

import numpy as np
import pytest

from megatron_cropi.config.loader import ConfigError
from megatron_cropi.influence.shortlist import ShortlistConfig, carry_ranking, shortlist_mask

IDS = [f"p{i}" for i in range(10)]
LIVE = np.array([True] * 8 + [False] * 2)  # p8, p9: all rewards equal, never scored
CARRIED = {f"p{i}": s for i, s in enumerate([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4])}


def test_stage_zero_full_every_and_no_ranking_score_every_live_row():
    cfg = ShortlistConfig(fraction=0.5, explore=0.0, full_every=3)
    for m, carried in ((0, CARRIED), (3, CARRIED), (6, CARRIED), (1, None)):
        assert shortlist_mask(cfg, m, IDS, LIVE, carried, min_rows=1, seed=0).tolist() == LIVE.tolist()
    assert shortlist_mask(ShortlistConfig(), 1, IDS, LIVE, CARRIED, min_rows=1, seed=0).tolist() == LIVE.tolist()


def test_top_fraction_by_carried_score():
    mask = shortlist_mask(ShortlistConfig(fraction=0.5, explore=0.0), 1, IDS, LIVE, CARRIED, min_rows=1, seed=0)
    # by hand: half of the 8 live rows, the 4 best carried scores 0.9 (p1), 0.8 (p4), 0.7 (p6), 0.5 (p2)
    assert sorted(np.flatnonzero(mask).tolist()) == [1, 2, 4, 6]
    # never fewer rows than the selection's budget
    mask = shortlist_mask(ShortlistConfig(fraction=0.1, explore=0.0), 1, IDS, LIVE, CARRIED, min_rows=3, seed=0)
    assert sorted(np.flatnonzero(mask).tolist()) == [1, 4, 6]


def test_unranked_live_prompts_are_always_scored_and_exploration_draws_from_the_rest():
    carried = {k: v for k, v in CARRIED.items() if k not in ("p0", "p5")}  # p0, p5 new (e.g. after a refresh)
    mask = shortlist_mask(ShortlistConfig(fraction=0.5, explore=0.0), 1, IDS, LIVE, carried, min_rows=1, seed=0)
    assert sorted(np.flatnonzero(mask).tolist()) == [0, 1, 4, 5]  # the 2 unranked + the 2 best ranked
    cfg = ShortlistConfig(fraction=0.5, explore=0.5)
    masks = [shortlist_mask(cfg, m, IDS, LIVE, CARRIED, min_rows=1, seed=7) for m in (1, 2, 1)]
    for mask in masks:
        rows = set(np.flatnonzero(mask).tolist())
        assert len(rows) == 4 and not rows & {8, 9}
        assert {1, 4} <= rows  # the top (size − explore = 2 rows)
    assert masks[0].tolist() == masks[2].tolist(), "the draw is a function of (seed, stage)"


def test_carry_ranking_refreshes_scored_rows_and_keeps_the_rest():
    scores = np.array([1.0, -np.inf, 0.0, 5.0] + [9.0] * 6)
    scored = np.array([True, True, False, True] + [False] * 6)
    out = carry_ranking(CARRIED, IDS, scores, scored)
    assert out["p0"] == 1.0 and out["p3"] == 5.0  # rescored
    assert "p1" not in out  # rescored without a gradient: no score
    assert out["p2"] == CARRIED["p2"] and out["p7"] == CARRIED["p7"]  # carried
    assert carry_ranking(None, IDS, scores, scored) == {"p0": 1.0, "p3": 5.0}


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="fraction"):
        ShortlistConfig(fraction=0.0)
    with pytest.raises(ConfigError, match="full_every"):
        ShortlistConfig(full_every=-1)
