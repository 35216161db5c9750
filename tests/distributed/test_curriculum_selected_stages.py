"""``curriculum.selected_stages``: the first stages train on a cropi selection, every later stage on the
whole pool, with no refresh, scoring or selection work for it (a warm start).

Oracle: the data's own pool (``load_prompt_set``), not the controller's view of it; the run
state says which steps ran, and ``features/`` and ``rollouts/`` hold only what stage 0 needed.
"""

import json

import pytest
import yaml


@pytest.mark.timeout(600)
def test_stages_past_selected_stages_train_on_the_whole_pool_and_score_nothing(tmp_path):
    from megatron_cropi.data.prompts import load_prompt_set
    from megatron_cropi.run_config import load_run_config
    from megatron_cropi.testing.cli import run_cli
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    cfg = tiny_curriculum_config(str(tmp_path / "a"), **{
        "curriculum.selected_stages": 1, "curriculum.refresh_behaviour_every": 1,
        "grpo.dynamic_sampling": {"enabled": True}})
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, log = run_cli(["run", str(path)], timeout=300)
    assert rc == 0, log[-4000:]
    out = tmp_path / "a"
    pool = {p.prompt_id for p in load_prompt_set(load_run_config(path).data, "pool").records}

    stage0 = json.loads((out / "selections" / "stage0.json").read_text())
    stage1 = json.loads((out / "selections" / "stage1.json").read_text())
    # at most the budget: a shortfall when fewer live prompts have a gradient
    assert stage0["policy"] == "cropi" and 0 < len(stage0["prompt_ids"]) <= int(0.25 * len(pool))
    assert set(stage0["prompt_ids"]) < pool
    assert stage1["policy"] == "full" and sorted(stage1["prompt_ids"]) == sorted(pool)
    state = json.loads((out / "state.json").read_text())
    done = set(state["done"])
    assert {"stage0/score/pool", "stage1/train"} <= done
    assert not any(s.startswith(("stage1/score", "stage1/refresh")) for s in done), sorted(done)
    assert "whole-pool stage" in state["info"]["stage1/probe"]["skipped"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"] == "cropi for stages 0-0, then full (curriculum.selected_stages)"
    assert [p.name for p in (out / "features").iterdir()] == ["stage0"]
    assert not (out / "rollouts" / "stage1").exists(), "stage 1 selects nothing: no refresh"
    report = json.loads((out / "reports" / "stage1.json").read_text())
    assert report["policy"] == "full" and report["selected"] == len(pool)
