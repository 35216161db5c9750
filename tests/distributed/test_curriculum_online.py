"""``cropi run`` with ``selection.policy: online_learnability``: at every stage the pool (here a random
half of it) is rolled out at the current checkpoint θ_m with ``curriculum.online_samples`` responses at
GRPO's temperature, and the stage trains on the top ``selection.ratio`` of the whole pool by
``p(1−p)``. β's rollouts are skipped. The selection is checked against the stored rollouts by hand.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

OVERRIDES = {
    "selection.policy": "online_learnability",
    "curriculum.online_samples": 4,
    "curriculum.online_pool_fraction": 0.5,
    "curriculum.behaviour_temperature": 0.5,  # β's: must not be used by the online rollouts
    "rollout.temperature": 1.0,
}


@pytest.mark.timeout(300)
def test_online_learnability_run_rolls_out_each_stage_and_selects_the_top_by_hand(tmp_path):
    from megatron_cropi.influence.stores import read_complete_store
    from megatron_cropi.testing.cli import run_cli
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    out = tmp_path / "run"
    cfg = tiny_curriculum_config(str(out), **OVERRIDES)
    path = tmp_path / "online.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, log = run_cli(["run", str(path)], fault="online_rollouts", timeout=240)  # dies after stage 0's rollouts
    assert rc == 17, log[-3000:]
    rc, log = run_cli(["run", str(path)], timeout=240)
    assert rc == 0, log[-4000:]

    state = json.loads((out / "state.json").read_text())
    assert state["info"]["rollouts"]["skipped"].startswith("policy online_learnability")
    assert not (out / "rollouts" / "pool").exists()
    assert state["clock"]["selection"] > 0
    pool_size = 4 * cfg["data"]["synthetic"]["per_family"]
    budget = int(cfg["selection"]["ratio"] * pool_size)
    stores = []
    for m in range(cfg["curriculum"]["stages"]):
        groups, sampling = read_complete_store(out / "rollouts" / f"stage{m}" / "pool")
        assert len(groups) == pool_size // 2
        assert sampling.n == 4 and sampling.temperature == 1.0
        assert all(len(g.rewards) == 4 for g in groups)
        pass_rate = {g.prompt_id: float(np.mean(np.asarray(g.rewards) > 0.5)) for g in groups}
        key = {i: p * (1 - p) for i, p in pass_rate.items()}
        stores.append(sorted(pass_rate))

        sel = json.loads((out / "selections" / f"stage{m}.json").read_text())
        assert sel["policy"] == "online_learnability" and sel["summary"]["budget"] == budget
        picked = sel["prompt_ids"]
        assert len(picked) == len(set(picked)) == min(budget, len(groups))
        assert set(picked) <= set(key), "picked a prompt that was not rolled out"
        assert sel["scores"] == pytest.approx([key[i] for i in picked], abs=1e-12)
        rest = [key[i] for i in key if i not in set(picked)]
        assert min(sel["scores"]) >= max(rest, default=-1.0), "not the top by p(1-p)"
        assert sel["scores"] == sorted(sel["scores"], reverse=True)
        assert sel["summary"]["rolled_out"] == len(groups)
        assert sel["summary"]["rolled_out_mean_pass_rate"] == pytest.approx(np.mean(list(pass_rate.values())))

        report = json.loads((out / "reports" / f"stage{m}.json").read_text())
        assert report["policy"] == "online_learnability"
        assert report["online_rollouts"]["prompts"] == pool_size // 2
        assert f"stage{m}/online_rollouts" in state["done"]
    assert stores[0] != stores[1], "each stage draws its own half of the pool"
    assert (out / "final_hf" / "config.json").exists() and (out / "summary.json").exists()
    # the restart found stage 0's store complete (killed before it was marked done): nothing rolled out again
    assert state["info"]["stage0/online_rollouts"]["rolled_out"] == 0
    assert state["info"]["stage1/online_rollouts"]["rolled_out"] == pool_size // 2


@pytest.mark.timeout(300)
def test_full_with_dynamic_sampling_run_logs_kept_groups_and_extra_rounds(tmp_path):
    from megatron_cropi.metrics import read_scalars
    from megatron_cropi.testing.cli import run_cli
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    out = tmp_path / "run"
    cfg = tiny_curriculum_config(str(out), **{"selection.policy": "full",
                                              "grpo.dynamic_sampling": {"enabled": True, "max_extra_rounds": 2}})
    path = tmp_path / "full-dynamic.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, log = run_cli(["run", str(path)], timeout=240)
    assert rc == 0, log[-4000:]
    scalars = read_scalars(out / "tensorboard")
    steps = cfg["curriculum"]["stages"] * cfg["curriculum"]["steps_per_stage"]
    kept = [v for _, v in scalars["train/kept_groups"]]
    rounds = [v for _, v in scalars["train/extra_rounds"]]
    dropped = [v for _, v in scalars["train/dropped_groups"]]
    sampled = [v for _, v in scalars["train/sampled_groups"]]
    size = cfg["grpo"]["prompts_per_step"]
    assert len(kept) == len(rounds) == steps
    assert all(0 <= k <= size for k in kept) and all(0 <= r <= 2 for r in rounds)
    # every step rolled out (1 + extra rounds) × prompts_per_step groups: kept, dropped or surplus
    assert sampled == [size * (1 + r) for r in rounds]
    assert all(k + d <= s for k, d, s in zip(kept, dropped, sampled))
    # a round is added only while fewer than prompts_per_step groups are kept: the first r rounds
    # (r × prompts_per_step groups) dropped more than (r − 1) × prompts_per_step of them
    assert all(r == 0 or d > size * (r - 1) for r, d in zip(rounds, dropped))
    assert sum(rounds) > 0 and sum(dropped) > 0, "the run never refilled a batch: the check is vacuous"
    sel = json.loads((out / "selections" / "stage0.json").read_text())
    assert sel["policy"] == "full" and len(sel["prompt_ids"]) == 4 * cfg["data"]["synthetic"]["per_family"]
