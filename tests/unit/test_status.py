"""``cropi status RUN_DIR`` on a run directory mid-run and after it finished."""

import json

import pytest

from megatron_cropi.cli import main
from megatron_cropi.commands.status import format_status, run_status
from megatron_cropi.config.loader import from_dict, to_dict
from megatron_cropi.curriculum.state import RunState
from megatron_cropi.layout import RunLayout
from megatron_cropi.run_config import RunConfig
from megatron_cropi.utils.atomic import atomic_write_json

POOL = 200


def _selection(layout, m, mix):
    ids = [f"p{i}" for i in range(sum(mix.values()))]
    atomic_write_json(layout.selection(m), {
        "policy": "cropi", "stage": m, "prompt_ids": ids, "scores": [0.1] * len(ids),
        "summary": {"pool": POOL, "candidates": POOL, "selected": len(ids), "source_mix": mix, "mean_pass_rate": 0.4,
                    "targets": {"add3c": {"target_prompts": 100, "target_prompts_used": 84, "with_gradient": 84}}}})


def _stage(state, layout, m, mix):
    state.mark_done(f"stage{m}/score/pool", {"rows": POOL, "scored": 80, "excluded": 120, "seconds": 4.0})
    state.mark_done(f"stage{m}/score/target-add3c", {"rows": 100, "scored": 84, "excluded": 16, "seconds": 2.0})
    state.mark_done(f"stage{m}/probe", {"spearman": 0.97, "precision_at_10pct": 1.0, "probe_prompts": 32})
    _selection(layout, m, mix)
    state.mark_done(f"stage{m}/select", {"seconds": 0.5})


@pytest.fixture
def running(tmp_path):
    """A run of 3 stages × 10 steps, killed or still going in stage 1's training at step 14."""
    cfg = to_dict(from_dict(RunConfig, {"run": {"output_dir": str(tmp_path / "run")},
                                        "curriculum": {"stages": 3, "steps_per_stage": 10, "eval": {"every": 5}}}))
    layout = RunLayout(tmp_path / "run")
    state = RunState.open(layout.root, cfg)
    state.mark_done("warmup", {"seconds": 30.0, "steps": 100})
    state.mark_done("rollouts")
    _stage(state, layout, 0, {"add3c": 12, "add2": 8})
    state.mark_done("stage0/train", {"step": 10})
    atomic_write_json(layout.stage_report(0), {"stage": 0, "overlap_with_previous": None})
    state.mark_done("stage0/report")
    _stage(state, layout, 1, {"add3c": 15, "rev": 5})
    state.update(train_step=14, stage=1, clock={"rollouts": 10.0, "scoring": 12.0, "selection": 1.0, "training": 28.0})
    (layout.checkpoints / "step_00000010").mkdir(parents=True)
    (layout.checkpoints / "step_00000010" / "weights.bin").write_bytes(b"\0" * 4096)
    layout.eval_log.parent.mkdir(parents=True)
    with layout.eval_log.open("w") as fh:
        for step in (0, 5, 10):
            fh.write(json.dumps({"step": step, "target_sampled": 0.1 + step / 100, "seconds": 2.0}) + "\n")
        fh.write('{"step": 15, "target_')  # an evaluation being appended right now
    return layout, state


def test_status_of_a_running_run(running):
    layout, _ = running
    s = run_status(layout.root, now=json.loads(layout.state.read_text())["updated"] + 90)
    assert not s["finished"] and (s["stage"], s["train_step"], s["total_steps"]) == (1, 14, 30)
    assert s["last_done"] == "stage1/select" and 89 < s["seconds_since_update"] < 91
    assert s["clock_seconds"]["training"] == 28.0 and s["warmup_seconds"] == 30.0 and s["eval_seconds"] == 6.0
    # 16 steps at 2 s, 1 stage's scoring + selection at 6.5 s, 3.2 evaluations at 2 s
    assert s["estimated_seconds_left"] == pytest.approx(16 * 2 + 6.5 + 16 / 5 * 2)
    assert s["last_eval"]["step"] == 10
    assert s["disk_bytes"]["checkpoints"] == 4096 and s["disk_bytes"]["total"] > 4096
    sel = s["last_selection"]
    assert (sel["stage"], sel["selected"], sel["pool"]) == (1, 20, POOL)
    assert sel["source_mix"] == {"add3c": 15, "rev": 5} and sel["zero_variance_share"] == pytest.approx(0.6)
    assert sel["probe"]["spearman"] == 0.97 and sel["target_prompts_used"] == {"add3c": {"used": 84, "of": 100}}
    text = format_status(s)
    assert "not finished; state.json updated 1m30s ago" in text and "GRPO step  14 / 30" in text
    assert "add3c 75%, rev 25%" in text and "zero-variance pool prompts 120 of 200 (60%)" in text
    assert "probe Spearman 0.970" in text and "target add3c: 84 of 100 prompts used" in text
    assert "time left" in text


def test_status_of_a_finished_run_through_the_cli(running, capsys):
    layout, state = running
    state.mark_done("stage1/train", {"step": 20})
    _stage(state, layout, 2, {"add3c": 18, "sub2": 2})
    state.mark_done("stage2/train", {"step": 30})
    state.mark_done("final_hf")
    state.update(train_step=30, stage=2)
    assert main(["status", str(layout.root)]) == 0
    text = capsys.readouterr().out
    assert "(finished)" in text and "GRPO step  30 / 30" in text and "stage 2 (cropi)" in text
    assert "time left" not in text
    assert main(["status", str(layout.root), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["finished"] and s["last_selection"]["source_mix"] == {"add3c": 18, "sub2": 2}
    assert "estimated_seconds_left" not in s


def test_status_of_a_directory_without_a_run(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a `cropi run` directory" in capsys.readouterr().err


def _after_stage0(tmp_path, **curriculum):
    """A run of stages × 10 steps (``curriculum`` keys) whose stage 0 scored, selected, trained and reported."""
    cfg = to_dict(from_dict(RunConfig, {"run": {"output_dir": str(tmp_path / "run")},
                                        "curriculum": {"steps_per_stage": 10, "eval": {"every": 5}, **curriculum}}))
    layout = RunLayout(tmp_path / "run")
    state = RunState.open(layout.root, cfg)
    _stage(state, layout, 0, {"add3c": 12, "add2": 8})
    state.mark_done("stage0/train", {"step": 10})
    state.mark_done("stage0/report")
    return layout, state


def test_status_counts_scoring_only_for_the_stages_that_select(tmp_path):
    """``curriculum.selected_stages: 1``: stage 0 scored and selected; stage 1's whole-pool selection costs
    no scoring, and stage 2 will score nothing either: only training and evaluations remain."""
    layout, state = _after_stage0(tmp_path, stages=3, selected_stages=1)
    state.mark_done("stage1/select", {"seconds": 0.1})
    state.update(train_step=14, stage=1, clock={"rollouts": 10.0, "scoring": 12.0, "selection": 1.0, "training": 28.0})
    s = run_status(layout.root)
    assert s["estimated_seconds_left"] == pytest.approx(16 * 2)  # 16 steps at 2 s; no evaluations logged yet


def test_status_of_a_stage_holding_an_earlier_selection(tmp_path):
    """``curriculum.select_every: 2`` of 4 stages: stage 1 holds stage 0's selection, so its health is stage
    0's (probe, zero-variance share), and of the stages left only stage 2 scores."""
    layout, state = _after_stage0(tmp_path, stages=4, select_every=2)
    held = json.loads(layout.selection(0).read_text())
    held["stage"], held["summary"]["held_from_stage"] = 1, 0
    atomic_write_json(layout.selection(1), held)
    state.mark_done("stage1/select", {"seconds": 0.0, "held_from": 0})
    state.update(train_step=14, stage=1, clock={"rollouts": 10.0, "scoring": 12.0, "selection": 1.0, "training": 28.0})
    s = run_status(layout.root)
    sel = s["last_selection"]
    assert (sel["stage"], sel["held_from_stage"], sel["selected"]) == (1, 0, 20)
    assert sel["probe"]["spearman"] == 0.97 and sel["zero_variance_prompts"] == 120
    # 26 steps at 2 s, and one more scoring + selection (stage 2) at stage 0's 13 s
    assert s["estimated_seconds_left"] == pytest.approx(26 * 2 + 13)
    assert "selection  stage 1 (cropi, stage 0's held (curriculum.select_every)): 20 of 200" in format_status(s)


def test_status_names_an_external_background_job_nobody_has_taken(tmp_path):
    """``curriculum.background_scorer: external``: the run waits for a scoring job the operator launches;
    status says whether one has taken the stage's job (this attempt's files only), and if it failed."""
    cfg = to_dict(from_dict(RunConfig, {"run": {"output_dir": str(tmp_path / "run")},
                                        "selection": {"policy": "cropi"},
                                        "curriculum": {"stages": 2, "steps_per_stage": 10, "background_scoring": True,
                                                       "background_scorer": "external"}}))
    layout = RunLayout(tmp_path / "run")
    state = RunState.open(layout.root, cfg)
    state.mark_done("rollouts")
    state.update(train_step=3, stage=0, clock={"training": 6.0})
    here = layout.background(0)
    here.mkdir(parents=True)
    atomic_write_json(here / "job.json", {"stage": 0, "attempt": "a2"})
    atomic_write_json(here / "taken.json", {"attempt": "a1", "world": 8})  # an earlier attempt's
    text = format_status(run_status(layout.root))
    assert "background stage 0" in text and "not taken by any scoring job yet" in text and "serve-scoring" in text
    atomic_write_json(here / "taken.json", {"attempt": "a2", "world": 16})
    s = run_status(layout.root)
    assert s["background_job"]["taken"] and s["background_job"]["world"] == 16
    assert "taken by the scoring job (16 processes), working" in format_status(s)
    assert "heartbeat" not in format_status(s)
    atomic_write_json(layout.background_root / "serving.json", {"owner": "x", "time": 1.0})
    assert "it may have died, relaunch it" in format_status(run_status(layout.root))
    atomic_write_json(here / "error.json", {"attempt": "a2", "error": "RuntimeError: disk full"})
    assert "failed: RuntimeError: disk full" in format_status(run_status(layout.root))
    state.mark_done("stage0/select", {"seconds": 1.0, "switch_step": 5})  # recorded: nothing in flight
    assert run_status(layout.root)["background_job"] is None
