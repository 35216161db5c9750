"""``CropiSelector``: the in-process API scores the whole pool at a checkpoint and picks what the cropi
selection policy picks for the same budget (one target set); a second call reads the feature stores back.

One short ``cropi run`` on the tiny synthetic suite makes the behaviour rollouts and a checkpoint; the
API runs in a spawned process (it initialises torch.distributed, which the test process must not).
"""

import math
from pathlib import Path

import pytest
import yaml


def _use_api(cfg_path: str, checkpoint: str, budget: int) -> dict:
    from megatron_cropi.api import CropiSelector
    from megatron_cropi.curriculum.steps import selection_inputs
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.selection.policies import select

    import dataclasses

    selector = CropiSelector(cfg_path)
    scores = selector.score(checkpoint)
    again = selector.score(checkpoint)  # feature stores read back: nothing recomputed, same scores
    chosen = selector.select(scores, budget)
    records = selector.records(chosen)
    # the cropi policy on the same feature stores, with the budget's ratio
    cfg, run = selector.cfg, RunLayout(selector.cfg.run.output_dir)
    features = {p.name: p for p in (run.root / "select" / Path(checkpoint).name / "features" / "stage0").iterdir()}
    inputs = selection_inputs(selector.pool, pool_rollouts=run.rollouts("pool"), features=features, previous=set())
    ratio = (budget + 0.5) / len(selector.pool)  # int(ratio × pool) == budget
    policy = select(dataclasses.replace(cfg.selection, ratio=ratio), inputs, stage=0, seed=cfg.run.seed)
    return {"scores": scores, "again": again, "chosen": chosen, "policy": policy.prompt_ids,
            "pool": [p.prompt_id for p in selector.pool], "texts": [r.text for r in records],
            "chosen_texts": {p.prompt_id: p.text for p in selector.pool}}


@pytest.mark.timeout(900)
def test_selector_scores_the_pool_and_selects_like_the_cropi_policy(tmp_path):
    from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint
    from megatron_cropi.testing.cli import run_cli
    from megatron_cropi.testing.spawn import run_ranks
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_curriculum_config(str(tmp_path / "run"))))
    rc, log = run_cli(["run", str(cfg)], timeout=600)
    assert rc == 0, log[-3000:]
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    budget = 4
    got = run_ranks(_use_api, 1, args=(str(cfg), str(ckpt), budget), timeout_s=600)[0]
    scores = got["scores"]
    assert sorted(scores) == sorted(got["pool"])  # every pool prompt has a score
    live = {pid: s for pid, s in scores.items() if math.isfinite(s)}
    assert budget < len(live) < len(scores)  # some prompts have no gradient: -inf
    assert all(s == -math.inf for s in scores.values() if not math.isfinite(s))
    assert got["again"] == scores
    assert got["chosen"] == got["policy"]  # the cropi policy's picks for this budget, in its order
    assert got["chosen"] == sorted(live, key=lambda pid: -live[pid])[:budget]
    assert got["texts"] == [got["chosen_texts"][pid] for pid in got["chosen"]]
    with pytest.raises(ValueError, match="budget"):
        from megatron_cropi.api import CropiSelector

        CropiSelector.select(scores, 0)
