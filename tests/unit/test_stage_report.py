"""Stage reports and the run summary's policy label (``curriculum/report.py``), for the stage schedules
``curriculum.selected_stages`` and ``curriculum.select_every`` make."""

from megatron_cropi.curriculum.report import policy_label, write_stage_report
from megatron_cropi.layout import RunLayout
from megatron_cropi.selection.policies import Selection


def test_policy_label_names_the_schedule():
    assert policy_label("cropi", 0, 6) == "cropi"
    assert policy_label("cropi", 6, 6) == "cropi"
    assert policy_label("cropi", 1, 6) == "cropi for stages 0-0, then full (curriculum.selected_stages)"
    assert policy_label("cropi", 2, 6, select_every=2) == ("cropi for stages 0-1, then full (curriculum.selected_stages)"
                                                           ", each selection held for up to 2 stages "
                                                           "(curriculum.select_every)")
    assert policy_label("random", 0, 5, select_every=3).startswith("random, each selection held for up to 3")


def test_a_held_stage_report_names_the_stage_it_holds(tmp_path):
    layout = RunLayout(tmp_path / "run")
    summary = {"pool": 40, "budget": 4, "source_mix": {"add3c": 3, "max": 1}}
    made = Selection(stage=0, policy="cropi", rows=[3, 1, 2, 0], prompt_ids=["d", "b", "c", "a"],
                     scores=[0.4, 0.3, 0.2, 0.1], summary=summary)
    held = Selection(stage=1, policy="cropi", rows=made.rows, prompt_ids=made.prompt_ids, scores=made.scores,
                     summary={**summary, "held_from_stage": 0})
    report = write_stage_report(1, held, made, step_info={"stage1/train": {"step": 20}}, steps_per_stage=10,
                                layout=layout)
    assert (report["steps"], report["selected"], report["overlap_with_previous"]) == ([10, 20], 4, 1.0)
    assert report["selection"]["held_from_stage"] == 0 and report["scoring"] == {}
    text = layout.stage_report(1, "md").read_text()
    assert "stage 0's selection again (curriculum.select_every)" in text
    write_stage_report(0, made, None, step_info={}, steps_per_stage=10, layout=layout)
    assert "selection again" not in layout.stage_report(0, "md").read_text()
