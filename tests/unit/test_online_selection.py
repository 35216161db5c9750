"""The cheap selectors CROPI is compared with: ``online_learnability`` (top ``ratio`` of the pool by
``p(1−p)`` of the current policy's pass rates) and GRPO's dynamic sampling, as configuration and as
pure functions. Expected picks are computed by hand below, not by the code under test."""

import dataclasses

import numpy as np
import pytest

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.records import PromptRecord, SamplingParams
from megatron_cropi.selection.policies import SelectionConfig, SelectionError, SelectionInputs, select

# K = 4 responses per prompt, so p ∈ {0, ¼, ½, ¾, 1}; p(1−p) by hand: 0, 3/16, 1/4, 3/16, 0
PASS = [0.0, 0.25, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.5, 1.0]
LEARNABILITY = [0.0, 0.1875, 0.25, 0.0, 0.1875, 0.25, 0.1875, 0.0, 0.25, 0.0]


def _inputs(pass_rates=PASS):
    n = len(pass_rates)
    return SelectionInputs(prompt_ids=[f"p{i}" for i in range(n)], pass_rates=np.array(pass_rates, dtype=float),
                           sources=["a" if i % 2 else "b" for i in range(n)])


def _online(ratio):
    return SelectionConfig(policy="online_learnability", ratio=ratio)


def test_picks_exactly_the_top_ratio_by_p_times_one_minus_p():
    sel = select(_online(0.3), _inputs(), stage=0, seed=1)  # m = int(0.3 × 10) = 3: the three p = ½ prompts
    assert sel.policy == "online_learnability"
    assert sorted(sel.prompt_ids) == ["p2", "p5", "p8"]
    assert sel.scores == [0.25, 0.25, 0.25]
    assert sel.summary["selected"] == 3 and sel.summary["budget"] == 3 and sel.summary["rolled_out"] == 10
    assert sel.summary["mean_pass_rate"] == 0.5


def test_ties_at_the_boundary_are_broken_at_random_deterministically_per_seed():
    # m = 4: the three p = ½ prompts, then one of the three tied at 3/16 (rows 1, 4, 6)
    fourth = {}
    for seed in range(12):
        a = select(_online(0.4), _inputs(), stage=0, seed=seed)
        b = select(_online(0.4), _inputs(), stage=0, seed=seed)
        assert a.prompt_ids == b.prompt_ids and a.scores == b.scores  # same seed, same choice
        assert sorted(a.prompt_ids[:3]) == ["p2", "p5", "p8"]  # best first
        assert a.prompt_ids[3] in ("p1", "p4", "p6")
        assert a.scores == [0.25, 0.25, 0.25, 0.1875]
        fourth[seed] = a.prompt_ids[3]
    assert len(set(fourth.values())) > 1, f"the tie-break never changes with the seed: {fourth}"
    # the stage enters the tie-break stream too
    stages = {select(_online(0.4), _inputs(), stage=m, seed=0).prompt_ids[3] for m in range(12)}
    assert len(stages) > 1


def test_prompts_not_rolled_out_cannot_be_picked_and_the_budget_is_over_the_whole_pool():
    p = list(PASS)
    p[2] = p[5] = float("nan")  # a partial roll-out: two of the best prompts have no pass rate
    sel = select(_online(0.3), _inputs(p), stage=0, seed=0)
    assert sel.prompt_ids[0] == "p8" and sorted(sel.prompt_ids[1:]) in (["p1", "p4"], ["p1", "p6"], ["p4", "p6"])
    assert sel.summary["rolled_out"] == 8 and sel.summary["budget"] == 3
    # fewer prompts rolled out than the budget: all of them, and the shortfall is said
    only = [float("nan")] * 10
    only[3], only[4] = 1.0, 0.75
    sel = select(_online(0.3), _inputs(only), stage=0, seed=0)
    assert sel.prompt_ids == ["p4", "p3"] and "shortfall" in sel.summary
    with pytest.raises(SelectionError, match="no pass rate of the current policy"):
        select(_online(0.3), _inputs([float("nan")] * 10), stage=0, seed=0)


def test_exclude_previous_applies():
    cfg = SelectionConfig(policy="online_learnability", ratio=0.3, exclude_previous=True)
    inp = _inputs()
    inp.previous = {"p2", "p5"}
    sel = select(cfg, inp, stage=1, seed=0)
    assert sel.prompt_ids[0] == "p8" and set(sel.prompt_ids[1:]) <= {"p1", "p4", "p6"}


def test_config_keys_and_bad_values_name_the_key():
    from megatron_cropi.run_config import RunConfig

    cfg = from_dict(RunConfig, {
        "selection": {"policy": "online_learnability"},
        "curriculum": {"online_samples": 6, "online_pool_fraction": 0.25},
        "grpo": {"dynamic_sampling": {"enabled": True, "max_extra_rounds": 2}},
    })
    assert cfg.selection.policy == "online_learnability"
    assert (cfg.curriculum.online_samples, cfg.curriculum.online_pool_fraction) == (6, 0.25)
    assert cfg.grpo.dynamic_sampling.enabled and cfg.grpo.dynamic_sampling.max_extra_rounds == 2
    defaults = RunConfig()
    assert not defaults.grpo.dynamic_sampling.enabled and defaults.curriculum.online_samples == 4
    assert defaults.curriculum.online_pool_fraction == 1.0
    bad = [
        ({"grpo": {"dynamic_sampling": {"max_extra_rounds": -1}}}, "grpo.dynamic_sampling.max_extra_rounds", "-1"),
        ({"grpo": {"dynamic_sampling": {"enabled": "yes"}}}, "grpo.dynamic_sampling.enabled", "'yes'"),
        ({"grpo": {"dynamic_sampling": {"max_rounds": 3}}}, "grpo.dynamic_sampling.max_rounds", "unknown key"),
        ({"curriculum": {"online_samples": 1}}, "curriculum.online_samples", "got 1"),
        ({"curriculum": {"online_pool_fraction": 0.0}}, "curriculum.online_pool_fraction", "got 0.0"),
        ({"curriculum": {"online_pool_fraction": 1.5}}, "curriculum.online_pool_fraction", "got 1.5"),
        ({"selection": {"policy": "online"}}, "selection.policy", "'online'"),
    ]
    for doc, key, value in bad:
        with pytest.raises(ConfigError) as err:
            from_dict(RunConfig, doc)
        assert err.value.key == key and value in str(err.value), str(err.value)


def _pool(n):
    return [PromptRecord(prompt_id=f"id{i:03d}", token_ids=np.array([1, 2], dtype=np.int32), answer="", source="s") for i in range(n)]


def test_online_pool_subset_and_sampling():
    from megatron_cropi.curriculum.behaviour import online_pool_subset, online_sampling

    pool = _pool(40)[::-1]  # any order in; prompt-id order out
    full = online_pool_subset(pool, 1.0, seed=3, m=0)
    assert [p.prompt_id for p in full] == [f"id{i:03d}" for i in range(40)]
    a = online_pool_subset(pool, 0.25, seed=3, m=0)
    assert len(a) == 10 and len({p.prompt_id for p in a}) == 10
    assert [p.prompt_id for p in a] == sorted(p.prompt_id for p in a)
    assert [p.prompt_id for p in a] == [p.prompt_id for p in online_pool_subset(pool, 0.25, seed=3, m=0)]
    assert {p.prompt_id for p in a} != {p.prompt_id for p in online_pool_subset(pool, 0.25, seed=3, m=1)}
    assert len(online_pool_subset(pool, 0.001, seed=3, m=0)) == 1
    grpo = SamplingParams(n=8, temperature=1.0, max_tokens=7, seed=11)
    s0, s1 = online_sampling(grpo, 4, 0), online_sampling(grpo, 4, 1)
    assert (s0.n, s0.temperature, s0.max_tokens) == (4, 1.0, 7)  # GRPO's temperature and length, not β's
    assert s0.seed != s1.seed and s0.seed != grpo.seed
    assert dataclasses.replace(s0, seed=grpo.seed, n=8) == grpo


def test_layout_and_dry_run_accept_the_new_keys(tmp_path):
    from megatron_cropi.dryrun import dry_run
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.run_config import RunConfig
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    assert RunLayout(tmp_path).stage_rollouts(2, "pool") == tmp_path / "rollouts" / "stage2" / "pool"
    for overrides in ({"selection.policy": "online_learnability", "curriculum.online_samples": 4,
                       "curriculum.online_pool_fraction": 0.5},
                      {"selection.policy": "full", "grpo.dynamic_sampling": {"enabled": True, "max_extra_rounds": 3}}):
        cfg = from_dict(RunConfig, tiny_curriculum_config(str(tmp_path / "run"), **overrides))
        report = dry_run(cfg, world_size=1)
        assert report is not None


def test_dynamic_sampling_round_seeds():
    from megatron_cropi.grpo.dynamic_sampling import round_seed

    assert round_seed(12345, 0) == 12345  # round 0 samples what a plain step samples
    seeds = {round_seed(12345, r) for r in range(1, 20)}
    assert len(seeds) == 19 and 12345 not in seeds and all(0 <= s < 2 ** 31 for s in seeds)
