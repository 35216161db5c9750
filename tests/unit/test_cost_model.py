"""``benchmarks/cost_model.py``: it reproduces ``docs/at_scale.md`` §3 as first computed by hand, its padding
arithmetic is the scorer's, and its options price what they claim."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_cost_model():
    spec = importlib.util.spec_from_file_location("cost_model", ROOT / "benchmarks" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


cm = _load_cost_model()

# §3's table as computed by hand: behaviour h, scoring h, GRPO step s (rollout, train), 100 steps h, stage h.
HAND_TABLE = {
    "1.5B, 1 node": (0.8, 1.7, 51, 31, 20, 1.4, 3.1),
    "1.5B, 2 nodes": (0.4, 0.8, 41, 31, 10, 1.1, 2.0),
    "7B, 1 node": (7.5, 16.0, 278, 102, 176, 7.7, 23.7),
    "7B, 2 nodes": (3.8, 8.0, 191, 102, 89, 5.3, 13.3),
    "7B, 4 nodes": (1.9, 4.0, 147, 102, 45, 4.1, 8.1),
}


@pytest.fixture(scope="module")
def runs():
    return [cm.read_example(*example) for example in cm.EXAMPLES]


def test_reproduces_the_hand_computed_table(runs):
    for row in cm.reproduce_old_table(runs):
        behaviour, scoring, step, rollout, train, steps, stage = HAND_TABLE[row["config"]]
        hours = (row["behaviour_rollouts_h"], row["scoring_per_stage_h"], row["grpo_steps_h"], row["stage_h"])
        assert hours == pytest.approx((behaviour, scoring, steps, stage), abs=0.05 + 1e-9), row
        seconds = (row["grpo_step_s"], row["grpo_rollout_s"], row["grpo_train_s"])
        assert seconds == pytest.approx((step, rollout, train), abs=0.5 + 1e-9), row


def test_examples_read_through_the_loader(runs):
    by = {r.label: r for r in runs}
    assert by["1.5B, 1 node"].params == 1_543_714_304 and by["7B, 1 node"].params == 7_615_616_512
    assert (by["1.5B, 2 nodes"].tp, by["1.5B, 2 nodes"].pp, by["1.5B, 2 nodes"].dp) == (2, 1, 8)
    assert (by["7B, 4 nodes"].tp, by["7B, 4 nodes"].pp, by["7B, 4 nodes"].dp) == (4, 2, 4)
    assert by["7B, 1 node"].seq == 512 + 4096 and by["1.5B, 1 node"].target_samples == 32


def test_bucketed_lengths_match_the_scorers_calls():
    from megatron_cropi.popi.buckets import length_bucketed_calls

    rng = np.random.default_rng(3)
    longest = 150 + cm.sampled_response_lengths(999, 500, 2048, rng)
    for per_call in (1, 4, 8):
        calls = length_bucketed_calls(longest, responses_per_prompt=8, max_tokens=8 * 2560, max_prompts=1,
                                      microbatches_per_call=per_call, multiple=8, cap=2560)
        scorer = sum(len(c.indices) * c.seq_length for c in calls)
        rows = cm.bucketed_row_lengths(longest, prompts_per_call=per_call, multiple=8, cap=2560)
        assert rows.sum() == scorer


def test_padding_agrees_with_the_cpu_measurement():
    check = cm.cpu_padding_cross_check()
    assert check["computed_padding_fraction_padded"] == pytest.approx(check["measured_padding_fraction_padded"], abs=0.03)
    assert check["computed_padding_fraction_bucketed"] == pytest.approx(check["measured_padding_fraction_bucketed"],
                                                                        abs=0.03)


def test_truncated_backward_over_every_layer_is_the_full_backward(runs):
    seven = next(r for r in runs if r.preset == "qwen2.5-7b")  # untied: every parameter scored either way
    full = cm.scoring_flops_per_row(seven, 1000.0, 1e6)
    assert cm.scoring_flops_per_row(seven, 1000.0, 1e6, last_layers=seven.layers) == pytest.approx(full, rel=1e-12)
    assert cm.scoring_flops_per_row(seven, 1000.0, 1e6, last_layers=seven.layers // 2) < 0.7 * full


def test_options_only_make_scoring_cheaper(runs):
    quality = cm.measured_quality()
    exact = cm.exact_options(quality)
    for run in runs:
        none = cm.stage_row(run)["scoring_per_stage_h"]
        bucketed = cm.stage_row(run, cm.ScoringOptions(bucketed=True))["scoring_per_stage_h"]
        skipped = cm.stage_row(run, exact)["scoring_per_stage_h"]
        shortlisted = cm.stage_row(run, replace(exact, shortlist=0.5))["scoring_per_stage_h"]
        assert none > bucketed > skipped > shortlisted
        assert skipped == pytest.approx(bucketed * (1 - 0.57), rel=0.15)  # the pool dominates; the target is not skipped


def test_quality_figures_are_the_measured_ones():
    quality = cm.measured_quality()
    assert (quality["zero_variance"]["pool_prompts"], quality["zero_variance"]["live_prompts"]) == (1990, 849)
    assert quality["last_layers_half"]["precision_at_10pct"] == pytest.approx(0.583, abs=1e-3)
    assert quality["responses_4"]["precision_at_10pct"] == pytest.approx(0.647, abs=1e-3)
    assert quality["bucketed"]["exact"] and quality["bucketed"]["max_rel_feature_diff"] < 1e-5


def test_length_aware_grpo_training_is_priced_where_the_trainer_applies_it(runs):
    """``grpo.length_aware_microbatches`` (on in every example) packs training rows by length at PP = 1
    only (``grpo/update.py``); the model pads at PP > 1 and without the option, as the trainer does."""
    by = {r.label: r for r in runs}
    one_node = by["1.5B, 1 node"]
    assert one_node.grpo_length_aware and one_node.pp == 1
    mean, mean_sq = cm.cost.grpo_row_lengths(one_node)
    real = 150 + cm.sampled_response_lengths(100_000, one_node.mean_response_tokens, one_node.max_tokens,
                                             np.random.default_rng(1)).mean()
    assert real < mean < one_node.seq and mean ** 2 <= mean_sq <= one_node.seq ** 2
    padded = replace(one_node, grpo_length_aware=False)
    assert cm.cost.grpo_row_lengths(padded) == (one_node.seq, one_node.seq ** 2)
    _, train = cm.grpo_step_seconds(one_node)
    _, train_padded = cm.grpo_step_seconds(padded)
    assert train < 0.7 * train_padded
    seven = by["7B, 1 node"]  # PP = 2: one length per step
    assert seven.pp == 2 and cm.cost.grpo_row_lengths(seven) == (seven.seq, seven.seq ** 2)


# docs/at_scale.md §3 computed by hand from column (b) (exact options), before the code priced it: a stage with
# its scoring off the critical path, in hours, and when its selection arrives, with as many and with half as
# many scoring GPUs as training has
HAND_BACKGROUND = {
    "1.5B, 1 node": (1.15, 0.40, 0.80),
    "1.5B, 2 nodes": (1.00, 0.23, 0.46),
    "7B, 1 node": (7.7, 0.38, 0.75),
    "7B, 2 nodes": (5.4, 0.26, 0.52),
    "7B, 4 nodes": (4.1, 0.18, 0.35),
}


def test_background_scoring_reproduces_the_hand_computed_stages(runs):
    exact = cm.exact_options(cm.measured_quality())
    for run in runs:
        row = cm.stage_row(run, exact)
        stage_h, switch, switch_half = HAND_BACKGROUND[run.label]
        bg = row["background"]
        assert bg["stage_h"] == pytest.approx(stage_h, abs=0.1), run.label
        assert bg["switch_fraction"] == pytest.approx(switch, abs=0.02), run.label
        assert bg["switch_fraction_half_scoring_gpus"] == pytest.approx(switch_half, abs=0.03), run.label
        assert bg["stage_h"] == pytest.approx(max(row["grpo_steps_h"], row["scoring_per_stage_h"]))
        assert bg["critical_scoring_share"] == 0.0  # scoring shorter than every example's stage


def test_background_stage_laws():
    assert cm.cost.background_stage(3.0, 10.0) == pytest.approx(
        {"stage_s": 10.0, "switch_fraction": 0.3, "critical_scoring_share": 0.0, "gpu_hours_scoring_share": 3 / 13})
    slow = cm.cost.background_stage(12.0, 10.0)
    assert slow["stage_s"] == 12.0 and slow["switch_fraction"] == 1.0 and slow["critical_scoring_share"] == pytest.approx(2 / 12)
    assert cm.cost.background_stage(3.0, 10.0, scoring_gpus=0.5)["switch_fraction"] == pytest.approx(0.6)


def test_scale_out_private_memory_does_not_grow_with_the_pool_at_a_fixed_share():
    """Scale-out keeps no per-row array in a rank's private memory: only the unit it scores and the cosines
    of its share of the rows (pool / world); the index, columns and plan are mapped once per node."""
    from megatron_cropi.cost_scale_out import scale_out_footprint

    def footprint(pool, nodes):
        return scale_out_footprint(pool_prompts=pool, nodes=nodes, tp=4, pp=2, k=1024, feature_bytes=2,
                                   responses=8, mean_response_tokens=500, prompt_tokens=100, live_fraction=0.5,
                                   prompts_per_unit=32)["scale_out"]

    small, big = footprint(10_000, 1), footprint(160_000, 16)  # 16x the pool on 16x the ranks
    assert big["per_rank_bytes"] == small["per_rank_bytes"]
    assert big["mapped_bytes_per_node"] == 16 * small["mapped_bytes_per_node"]  # page cache, shared by the node
    assert footprint(1_000_000, 128)["per_rank_bytes"] < 20e6
