"""``curriculum.refresh_behaviour_every``, ``selection.guard`` and ``scoring.shortlist`` in a whole ``cropi run``,
with GRPO's dynamic sampling on (the previous CPU default's combination: a refresh per stage and dynamic sampling).

With ``refresh_behaviour_every: 1`` stage 1 rolls the pool, the target set and the guard set out again
at θ_1 (GRPO step 3) into ``rollouts/stage1/`` and scores those; the stores' headers name θ_1 and a
sampling seed of their own. Stage 1 scores only a shortlist of the live pool (by stage 0's ranking,
carried in ``rankings/stage0.json``) and selects from it. A run killed inside the refresh (and, before that, inside β's rollouts)
and restarted ends with the same selections and final parameters as an uninterrupted one.
"""

import json

import pytest
import yaml

OVERRIDES = {
    "curriculum.refresh_behaviour_every": 1,
    "selection.guard": {"source": "check", "mode": "demote"},
    "scoring.shortlist": {"fraction": 0.5, "explore": 0.25},
    # a budget well below the live pool at θ_1, so the shortlist leaves rows out on any trajectory (at 0.25 the
    # budget's 12 rows can cover all that a refreshed 48-prompt pool has live)
    "selection.ratio": 0.1,
    "grpo.dynamic_sampling": {"enabled": True},
}


def _outcome(out):
    from safetensors.torch import load_file

    sels = {p.name: json.loads(p.read_text()) for p in sorted((out / "selections").glob("stage*.json"))}
    for s in sels.values():
        s["summary"].pop("seconds", None)
    return sels, load_file(str(out / "final_hf" / "model.safetensors"))


@pytest.mark.timeout(900)
def test_refresh_rolls_out_at_theta_m_scores_it_and_resumes_through_it(tmp_path):
    from megatron_cropi.rollout.store import TrajectoryStore
    from megatron_cropi.testing.cli import run_cli
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    runs = {}
    for name in ("a", "b"):
        cfg = tiny_curriculum_config(str(tmp_path / name), **OVERRIDES)
        runs[name] = tmp_path / f"{name}.yaml"
        runs[name].write_text(yaml.safe_dump(cfg))
    rc, log = run_cli(["run", str(runs["a"])], timeout=300)
    assert rc == 0, log[-4000:]
    a = tmp_path / "a"
    state = json.loads((a / "state.json").read_text())
    assert state["info"]["stage1/refresh"]["policy_step"] == 3
    assert "stage0/refresh" not in state["done"], "stage 0 scores β's own rollouts"
    for name in ("pool", "target-cmp", "guard"):
        beta, fresh = TrajectoryStore.open(a / "rollouts" / name), TrajectoryStore.open(a / "rollouts" / "stage1" / name)
        assert beta.complete and fresh.complete
        assert fresh.header.model == beta.header.model + "+grpo-step3"
        assert fresh.header.sampling_params.seed != beta.header.sampling_params.seed
        assert fresh.header.sampling_params.temperature == beta.header.sampling_params.temperature
    # stage 1 scored the refreshed stores: every zero-variance group of the refreshed pool is excluded
    # (and so are the live rows the shortlist left out)
    from megatron_cropi.influence.feature_store import EXCLUDED, FeatureStore

    fresh_pool = list(TrajectoryStore.open(a / "rollouts" / "stage1" / "pool").iter_groups())
    status = FeatureStore.load(a / "features" / "stage1" / "pool").statuses()
    assert all(st == EXCLUDED for g, st in zip(fresh_pool, status) if g.zero_variance)
    assert sum(st == EXCLUDED and not g.zero_variance for g, st in zip(fresh_pool, status)) == \
        state["info"]["stage1/score/pool"]["shortlisted_out"]
    sel = json.loads((a / "selections" / "stage1.json").read_text())
    assert sel["summary"]["guard"]["source"] == "check" and sel["summary"]["guard"]["guard_prompts_used"] > 0
    # the shortlist: stage 0 scored every live prompt, stage 1 a part of them, and picked only scored ones
    from megatron_cropi.influence.feature_store import DONE

    live = sum(not g.zero_variance for g in fresh_pool)
    info = state["info"]
    assert info["stage0/score/pool"]["shortlisted_out"] == 0
    assert info["stage1/score/pool"]["shortlisted_out"] > 0
    assert info["stage1/score/pool"]["scored"] == live - info["stage1/score/pool"]["shortlisted_out"]
    done = {g.prompt_id for g, st in zip(fresh_pool, status) if st == DONE}
    assert set(sel["prompt_ids"]) <= done
    ranking = json.loads((a / "rankings" / "stage0.json").read_text())["scores"]
    assert set(json.loads((a / "selections" / "stage0.json").read_text())["prompt_ids"]) <= set(ranking)
    report = json.loads((a / "reports" / "stage1.json").read_text())
    assert report["behaviour_refresh"]["policy_step"] == 3
    assert "guard (check, demote" in (a / "reports" / "stage1.md").read_text()
    assert state["clock"]["rollouts"] > 0
    # dynamic sampling ran in every stage's steps: each step logged its kept groups
    from megatron_cropi.metrics import read_scalars

    kept = read_scalars(a / "tensorboard").get("train/kept_groups", [])
    curriculum = yaml.safe_load(runs["a"].read_text())["curriculum"]
    assert len(kept) == curriculum["stages"] * curriculum["steps_per_stage"] and all(v > 0 for _, v in kept)

    # killed inside β's rollouts, then inside the refresh, then finished: same outcome
    b = tmp_path / "b"
    for fault in ("rollouts:pool", "refresh:pool"):
        rc, log = run_cli(["run", str(runs["b"])], fault=fault, timeout=300)
        assert rc == 17, log[-3000:]
    assert (b / "rollouts" / "stage1" / "pool").exists(), "the second kill was not inside the refresh"
    rc, log = run_cli(["run", str(runs["b"])], timeout=300)
    assert rc == 0, log[-3000:]
    (sels_a, params_a), (sels_b, params_b) = _outcome(a), _outcome(b)
    assert sels_a == sels_b
    for name, t in params_a.items():
        assert (params_b[name] == t).all(), f"{name} differs after kill/resume through the refresh"
