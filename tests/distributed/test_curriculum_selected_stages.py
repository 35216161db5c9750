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


def _set_hash(prompt_ids) -> str:
    """The data position's hash of a prompt set, computed here from the ids alone (a shuffled stream takes
    its set in prompt-id order, whatever order the selection lists it in)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for i in sorted(prompt_ids):
        h.update(i.encode() + b"\0")
    return h.hexdigest()


def _find(tree, key):
    """Every value of ``key`` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        return ([tree[key]] if key in tree else []) + [v for x in tree.values() for v in _find(x, key)]
    return [v for x in tree for v in _find(x, key)] if isinstance(tree, list) else []


@pytest.mark.timeout(900)
def test_a_held_stage_trains_on_the_earlier_selection_scores_nothing_and_resumes(tmp_path):
    """``curriculum.select_every: 2`` with ``selected_stages: 2`` of 3: stage 0 scores and selects, stage 1
    trains on stage 0's selection again (no refresh, scoring, probe or selection work), stage 2 on the
    whole pool. Oracles: stage 0's selection file, and the data position each stage's last checkpoint
    records (a hash of the training set's ids, recomputed here). Killed at the held stage's selection and
    twice inside its training (checkpoints every step), the restarted run ends where the uninterrupted one
    does."""
    from megatron_cropi.testing.cli import run_cli, run_outcome
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    def write(name: str) -> str:
        cfg = tiny_curriculum_config(str(tmp_path / name), **{
            "curriculum.stages": 3, "curriculum.selected_stages": 2, "curriculum.select_every": 2,
            "grpo.checkpoint": {"save_interval": 1, "keep_last": 0}})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    rc, log = run_cli(["run", write("a")], timeout=300)
    assert rc == 0, log[-4000:]
    out = tmp_path / "a"
    stage0, stage1, stage2 = (json.loads((out / "selections" / f"stage{m}.json").read_text()) for m in range(3))
    assert stage0["policy"] == "cropi" and stage0["prompt_ids"]
    assert (stage1["policy"], stage1["prompt_ids"], stage1["rows"]) == ("cropi", stage0["prompt_ids"], stage0["rows"])
    assert stage1["summary"]["held_from_stage"] == 0 and stage2["policy"] == "full"
    state = json.loads((out / "state.json").read_text())
    done = set(state["done"])
    assert {"stage0/score/pool", "stage0/probe", "stage1/select", "stage1/train"} <= done
    assert not any(s.startswith(("stage1/score", "stage1/probe", "stage1/refresh")) for s in done)
    assert state["info"]["stage1/select"]["held_from"] == 0
    assert [p.name for p in (out / "features").iterdir()] == ["stage0"]
    # what each stage trained on, as its end-of-stage checkpoint's data position records it
    meta = {s: json.loads((out / "checkpoints" / f"step_{s:08d}" / "meta.json").read_text()) for s in (3, 6)}
    assert _find(meta[3], "set_hash") == [_set_hash(stage0["prompt_ids"])]
    assert _find(meta[6], "set_hash") == [_set_hash(stage0["prompt_ids"])], "stage 1 trains on stage 0's selection"
    report = json.loads((out / "reports" / "stage1.json").read_text())
    assert report["selected"] == len(stage0["prompt_ids"]) and report["selection"]["held_from_stage"] == 0
    assert "stage 0's selection again (curriculum.select_every)" in (out / "reports" / "stage1.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"].endswith("each selection held for up to 2 stages (curriculum.select_every)")

    b = write("b")
    # stage 0's selection, its first step, the held selection, stage 1's first step (resumed from step 3), a
    # later one (resumed inside the held stage), stage 2's whole-pool selection (resumed from step 6)
    for fault in ("select", "train:step", "select", "train:step", "train:step", "select"):
        rc, log = run_cli(["run", b], fault=fault, timeout=300)
        assert rc in (0, 17), log[-3000:]
    rc, log = run_cli(["run", b], timeout=300)
    assert rc == 0, log[-3000:]
    ref, got = run_outcome(out), run_outcome(tmp_path / "b")
    assert got["selections"] == ref["selections"] and got["evals"] == ref["evals"]
    for name, t in ref["params"].items():
        assert (got["params"][name] == t).all(), f"{name} differs after kills in the held stage"


@pytest.mark.timeout(600)
def test_a_held_stage_after_a_background_stage_trains_on_its_selection(tmp_path, monkeypatch):
    """The benchmark's ``cropi_first2_hold_r10_dynamic_bg``: stage 0 scores in the background and switches to its
    selection part-way (``CROPI_BACKGROUND_SWITCH_AT=1``: after its first step), stage 1 holds that selection
    from its first step with no scorer of its own, stage 2 trains on the whole pool."""
    from megatron_cropi.testing.cli import run_cli
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    cfg = tiny_curriculum_config(str(tmp_path / "a"), **{
        "curriculum.stages": 3, "curriculum.selected_stages": 2, "curriculum.select_every": 2,
        "curriculum.background_scoring": True, "grpo.checkpoint": {"save_interval": 3, "keep_last": 0}})
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("CROPI_BACKGROUND_SWITCH_AT", "1")
    rc, log = run_cli(["run", str(path)], timeout=300)
    assert rc == 0, log[-4000:]
    out = tmp_path / "a"
    stage0, stage1 = (json.loads((out / "selections" / f"stage{m}.json").read_text()) for m in range(2))
    assert stage0["policy"] == "cropi" and stage1["prompt_ids"] == stage0["prompt_ids"]
    state = json.loads((out / "state.json").read_text())
    assert state["info"]["stage0/select"]["switch_step"] == 1 and state["info"]["stage1/select"]["held_from"] == 0
    assert not any(s.startswith("stage1/score") for s in state["done"])
    assert sorted(p.name for p in (out / "background").iterdir() if p.is_dir()) == ["stage0"], "no scorer for stage 1"
    meta = json.loads((out / "checkpoints" / f"step_{6:08d}" / "meta.json").read_text())
    assert _find(meta, "set_hash") == [_set_hash(stage0["prompt_ids"])]
