"""A selecting stage with its scoring off the critical path (``curriculum.background_scoring``).

    the scorer process started early (it loads while the parent rolls out, or trains the stage before);
        or, with ``curriculum.background_scorer: external``, the run's resolved config written for the
        scoring job the operator launched (``background/config.yaml``)
    θ_m as an HF directory (β's at stage 0; else exported, charged)  →  submit the job to the scorer
    GRPO steps of stage m on the whole pool; before each step: is the scorer done?
        yes → record score/select (``switch_step`` = this step)  →  the rest of the stage on the selection
    the stage's last step done and the scorer not: wait for it (charged)  →  ``switch_step`` null
    the stage's end: record the probe the scorer made after its selection (``probe.json``)

A run of any size may use an external scoring job: its global rank 0 writes the job and reads the
scorer's files, and every rank learns from it whether to switch before each step (one small broadcast a
step), so that all ranks switch at the same step. Waiting for the scorer (a forced switch, the stage's
end, the probe) is a loop of such polls, so no collective waits long, however late the scoring job.

The prompt set in force at any step is a function of the recorded switch (:func:`prompts_in_force`), so a
run killed anywhere resumes to the end state of an uninterrupted run that switched at the same step: a
checkpoint before the switch trains on the pool again and switches at the recorded step; a run killed
before the switch was recorded starts a new scorer, which resumes the feature stores.

``CROPI_BACKGROUND_SWITCH_AT=N`` (tests only) makes the switch deterministic: no poll before N steps into
the stage, a wait for the scorer there (N = 0: the stage trains as a foreground-scored one does).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from contextlib import nullcontext
from typing import Sequence

import uuid

import yaml

from megatron_cropi.curriculum import behaviour, steps
from megatron_cropi.curriculum.background import (PROBE_FILE, STALE_S, STOP_FILE, BackgroundJob, BackgroundScorer,
                                                  BackgroundWaitError, ExternalScorer)
from megatron_cropi.curriculum.faults import fault_point
from megatron_cropi.influence.scorer import ScoreStats
from megatron_cropi.records import PromptRecord
from megatron_cropi.selection.policies import Selection
from megatron_cropi.utils.atomic import atomic_write_text
from megatron_cropi.utils.rank_zero import on_rank0, share_from_rank0
from megatron_cropi.wiring import RunInputError

__all__ = ["SWITCH_AT_ENV", "uses_background", "rolls_out", "rollouts_step", "background_seconds", "prompts_in_force",
           "StageSwitch", "prestart", "stop_all", "train_stage"]

SWITCH_AT_ENV = "CROPI_BACKGROUND_SWITCH_AT"


def uses_background(cfg, stage: int) -> bool:
    """Whether stage ``stage`` scores in the background: a cropi stage that makes its own selection (not a
    whole-pool stage past ``curriculum.selected_stages``, nor one that holds an earlier selection)."""
    curriculum = cfg.curriculum
    return (bool(curriculum.background_scoring) and cfg.selection.policy == "cropi" and curriculum.selects(stage)
            and curriculum.held_from(stage) is None)


def rolls_out(cfg, stage: int) -> bool:
    """Whether stage ``stage``'s scorer makes the behaviour rollouts it scores (``curriculum.background_rollouts``):
    β's at stage 0, a refresh's at a refresh stage; the run then makes none for it."""
    curriculum = cfg.curriculum
    return (bool(curriculum.background_rollouts) and uses_background(cfg, stage)
            and (stage == 0 or behaviour.is_refresh_stage(stage, curriculum.refresh_behaviour_every)))


def rollouts_step(stage: int) -> str:
    """The state step that records stage ``stage``'s behaviour rollouts: β's (``rollouts``) or a refresh's."""
    return "rollouts" if stage == 0 else f"stage{stage}/refresh"


def background_seconds(background_clock: dict[str, float], scorers) -> float:
    """Seconds of work beside training so far: what ``background_clock`` records, plus the scorers still
    working (a scorer whose result is recorded is in the clock already, though it stays in ``scorers``
    until its stage ends)."""
    return float(sum(background_clock.values()) + sum(b.elapsed() for b in scorers if b.seconds is None))


def prompts_in_force(pool: Sequence[PromptRecord], selected: Sequence[PromptRecord] | None,
                     switch_step: int | None, step: int) -> list[PromptRecord]:
    """The prompts GRPO step ``step`` (1-based: the checkpoint ``step_<step>``) drew from: the selection
    after ``switch_step`` (the steps done when the stage switched), the whole pool up to it, and
    throughout when the selection came too late (``switch_step`` None)."""
    if selected is None or switch_step is None or step <= switch_step:
        return list(pool)
    return list(selected)


class StageSwitch:
    """``StageController.step_train``'s hooks for a background stage: the set at a step, the switch, pauses.

    Args:
        on_ready: ``on_ready(result, step)`` records the scorer's result and returns the selection.
        wait: blocks until the scorer's result is there and returns it (a forced switch), every rank.

    The scorer is asked on global rank 0 (its files are rank 0's) and every rank gets the answer.
    """

    def __init__(self, pool: Sequence[PromptRecord], *, scorer: BackgroundScorer | ExternalScorer | None = None,
                 selection: Selection | None = None, switch_step: int | None = None, on_ready=None,
                 switch_at: int | None = None, wait=None):
        self.pool, self.scorer, self.on_ready, self.switch_at = list(pool), scorer, on_ready, switch_at
        self.wait = wait
        self.selection, self.switch_step = selection, switch_step

    def _selected(self) -> list[PromptRecord] | None:
        return steps.selected_prompts(self.pool, self.selection) if self.selection is not None else None

    def prompts_at(self, step: int) -> list[PromptRecord]:
        """The set in force after ``step`` steps (before the switch :meth:`before_step` makes there)."""
        return prompts_in_force(self.pool, self._selected(), self.switch_step, step)

    def before_step(self, step: int) -> list[PromptRecord] | None:
        """The selection when the stage switches to it before ``step``'s GRPO step, else None."""
        if self.selection is None and self.scorer is not None:
            if self.switch_at is not None:
                result = self.wait() if step == self.switch_at else None
            else:
                result = on_rank0(self.scorer.poll)
            if result is not None:
                self.selection, self.switch_step = self.on_ready(result, step), step
                return self._selected()
            return None
        return self._selected() if self.switch_step == step else None

    def paused(self):
        """A block the scorer does not run in (evaluation)."""
        return self.scorer.paused() if self.scorer is not None and self.selection is None else nullcontext()


def _policy_dir(controller, stage: int) -> str:
    """θ_m as an HF directory: β's at stage 0 (when β has one), else ``background/stage{m}/policy_hf``,
    exported now (atomically: a complete directory or none) unless an earlier attempt left it."""
    runtime, layout = controller.runtime, controller.layout
    if stage == 0 and runtime.hf_dir:
        return str(runtime.hf_dir)
    out = layout.background(stage) / "policy_hf"
    if share_from_rank0((out / "config.json").exists() if controller.is_rank0 else None):
        return str(out)
    from megatron_cropi.checkpoint import save_model_as_hf

    controller.require_stage_start(stage, "background scoring policy")
    t0, tmp = time.perf_counter(), out.with_name("policy_hf.tmp")
    on_rank0(lambda: shutil.rmtree(tmp, ignore_errors=True))
    save_model_as_hf(runtime.trainer.ddp, controller.groups, controller.cfg.model, tmp, overwrite=True)
    on_rank0(lambda: os.replace(tmp, out))
    controller.charge("scoring", time.perf_counter() - t0)
    return str(out)


def _external(cfg) -> bool:
    return cfg.curriculum.background_scorer == "external"


def prestart(controller, first: int = 0) -> None:
    """Start the scorer of the first stage from ``first`` on that scores in the background and has not
    selected yet (into ``controller.background_scorers``), so that it loads before its job is ready. With
    an external scoring job: write the run's resolved config for it (``background/config.yaml``), once."""
    cfg = controller.cfg
    stage = next((m for m in range(first, cfg.curriculum.stages) if not controller.is_done(f"stage{m}/select")
                  and uses_background(cfg, m)), None)
    if stage is None or stage in controller.background_scorers:
        return
    if _external(cfg):
        root = controller.layout.background_root

        def write_config() -> None:
            root.mkdir(parents=True, exist_ok=True)
            (root / STOP_FILE).unlink(missing_ok=True)  # a run resumed after it had finished once
            atomic_write_text(root / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        on_rank0(write_config)
        return
    root = controller.layout.background(stage)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # the resolved config
    controller.background_scorers[stage] = BackgroundScorer.start(stage, root / "config.yaml", root / "job.json",
                                                                  root / "log", threads=max(cfg.run.num_threads, 1))


def stop_all(controller, *, finished: bool = False) -> None:
    """Kill every scorer still running (the run ends or fails). ``finished``: the run is done, so an
    external scoring job may stop too (``background/stop``); after a failure it waits for the restart."""
    for scorer in controller.background_scorers.values():
        scorer.kill()
    controller.background_scorers.clear()
    if finished and _external(controller.cfg) and controller.cfg.curriculum.background_scoring:
        def stop() -> None:
            root = controller.layout.background_root
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / STOP_FILE, "the run has finished\n")
        on_rank0(stop)


def _submit(controller, stage: int) -> BackgroundScorer | ExternalScorer:
    cfg, layout = controller.cfg, controller.layout
    prestart(controller, stage)
    if _external(cfg):
        controller.background_scorers[stage] = ExternalScorer(stage, layout.background(stage))
    scorer = controller.background_scorers[stage]
    names = steps.feature_set_names(controller.prompts.targets, guard=cfg.selection.guard.source == "check")
    rollouts_policy = ""
    if rolls_out(cfg, stage) and not controller.is_done(rollouts_step(stage)):  # the run's label for the policy
        start = stage * cfg.curriculum.steps_per_stage
        rollouts_policy = controller.policy_identity() + (f"+grpo-step{start}" if stage else "")
    job = BackgroundJob(stage=stage, policy_hf=_policy_dir(controller, stage), rollouts_policy=rollouts_policy,
                        checkpoint_step=stage * cfg.curriculum.steps_per_stage,
                        stores={n: str(controller.behaviour_store(stage, n)) for n in names},
                        features={n: str(layout.features(stage, n)) for n in names},
                        pool_rollouts=str(controller.behaviour_store(stage, "pool")),
                        result=str(layout.background(stage) / "result.json"),
                        attempt=share_from_rank0(uuid.uuid4().hex))

    def submit() -> str:
        layout.background(stage).mkdir(parents=True, exist_ok=True)
        scorer.submit(job)
        return scorer.job.attempt  # a restarted run may adopt an earlier attempt of the same work

    attempt = on_rank0(submit)
    if not controller.is_rank0:  # the other ranks' handle only keeps the time: rank 0 asks the scorer
        scorer.job, scorer.submitted = dataclasses.replace(job, attempt=attempt), time.perf_counter()
    controller.log(f"[background] stage {stage}: scoring and selection at θ_{stage} submitted ({scorer.describe()}); "
                   "training on the whole pool until they are done")
    return scorer


def _record(controller, stage: int, result: dict, switch_step: int | None) -> Selection:
    """Mark the scorer's steps done (the selection last: it carries the switch) and return the selection.
    The probe comes later (:func:`_record_probe`)."""
    rolled = result.get("rollouts")
    if rolled is not None:  # curriculum.background_rollouts: the scorer rolled the behaviour sets out first
        for label, record in rolled["sets"].items():
            controller.log(behaviour.rollouts_line_of(label, record) + " [background]")
        controller.charge("rollouts", rolled["seconds"], background=True)
        controller.mark_done(rollouts_step(stage), seconds=rolled["seconds"], background=True,
                             policy_step=stage * controller.cfg.curriculum.steps_per_stage)
    for name, stats in result["score"].items():
        fields = {k: v for k, v in stats.items() if k in ScoreStats.__dataclass_fields__}
        controller.log(steps.score_line(stage, name, ScoreStats(**fields)))
        controller.mark_done(f"stage{stage}/score/{name}", **stats)
    scoring = sum(s["wall_seconds"] for s in result["score"].values())
    controller.charge("scoring", scoring, background=True)
    controller.charge("selection", result["select_seconds"], background=True)
    seconds = result["background_seconds"]
    rolling = rolled["seconds"] if rolled is not None else 0.0
    controller.charge("startup", max(seconds - rolling - scoring - result["select_seconds"], 0.0), background=True)
    # rank 0 reads what the scorer wrote and shares it (a second job's file may reach other nodes later)
    selection = on_rank0(lambda: steps.read_selection(controller.layout.selection(stage)))
    where = f"from step {switch_step} on" if switch_step is not None else "after the stage's last step (not used)"
    controller.log(steps.select_line(stage, selection) + f" [background, {seconds:.1f} s; trains {where}]")
    controller.mark_done(f"stage{stage}/select", seconds=result["select_seconds"], background=True,
                         switch_step=switch_step, background_seconds=seconds)
    return selection


def _record_probe(controller, stage: int, scorer: BackgroundScorer | ExternalScorer | None) -> None:
    """Mark the stage's projection probe done at its end: the scorer's (it probes after writing the
    selection; what remains of it is waited for, not charged, like the foreground probe), or a note that it
    was lost when the run was restarted after the switch (the probe needs θ_m, which training has left)."""
    if controller.is_done(f"stage{stage}/probe"):
        return
    if scorer is not None:
        probe = _wait_together(controller, scorer, scorer.poll_probe, give_up=True)
        if probe is None:  # the job stopped serving after its result: the selection stands, the probe is lost
            probe = {"skipped": f"the scoring job stopped serving before its probe (waited "
                                f"curriculum.background_wait_s = {controller.cfg.curriculum.background_wait_s:.0f} s)"}
        probe = {k: v for k, v in probe.items() if k != "attempt"}  # the report's probe is the foreground's
    else:  # restarted after the switch: the scorer that made the selection may have left its probe
        path = controller.layout.background(stage) / PROBE_FILE
        probe = on_rank0(lambda: json.loads(path.read_text()) if path.exists() else None)
    controller.mark_done(f"stage{stage}/probe", **(probe or {"skipped": "the run restarted after the background "
                                                              "selection, before its scorer probed"}))


def _waiting_note(scorer) -> str:
    """What the run waits for, in words (rank 0: it reads the scorer's files)."""
    head = f"[background] stage {scorer.stage}: waiting for "
    if not isinstance(scorer, ExternalScorer):
        return head + f"the scorer ({scorer.elapsed():.0f} s)"
    if not scorer.taken():
        return head + (f"a scoring job to take the job in {scorer.root}: launch `torchrun ... -m megatron_cropi.cli "
                       "serve-scoring CONFIG` with this run's config")
    age = scorer.beat_unchanged_for()
    if age is not None and age > STALE_S:
        return head + f"the scoring job, whose heartbeat has not changed for {age:.0f} s: it may have died; relaunch it"
    return head + f"the scoring job ({scorer.elapsed():.0f} s)"


def _absent(scorer: ExternalScorer, limit: float) -> str:
    """Why the run stops waiting for an external scoring job, and what to do."""
    age = scorer.beat_unchanged_for()
    why = ("no scoring job took it" if not scorer.taken() else
           f"its scoring job's heartbeat has not changed for {age:.0f} s" if age is not None else
           "its scoring job writes no heartbeat")
    return (f"stage {scorer.stage}: no scoring job served the job in {scorer.root} for {limit:.0f} s "
            f"(curriculum.background_wait_s): {why}. Launch `torchrun ... -m megatron_cropi.cli serve-scoring "
            "CONFIG` with this run's config and run the same command again (it resumes here), or raise "
            "curriculum.background_wait_s (0: no limit)")


def _wait_together(controller, scorer, poll, *, poll_s: float = 0.05, note_every: float = 60.0,
                   give_up: bool = False):
    """Every rank waits for rank 0's ``poll()`` to return something, and returns it. One broadcast per
    poll, so no collective waits longer than a poll (a late scoring job outlasts the collective timeout);
    every ``note_every`` seconds rank 0 says what it waits for.

    An external scoring job that does not serve the job (not taken, or no heartbeat for
    :data:`~megatron_cropi.curriculum.background.STALE_S` s) for ``curriculum.background_wait_s`` seconds
    of this wait ends it: :class:`BackgroundWaitError` on every rank, or None with ``give_up``."""
    limit = controller.cfg.curriculum.background_wait_s if isinstance(scorer, ExternalScorer) else 0.0
    last = unserved_since = time.perf_counter()

    def ask():
        nonlocal unserved_since
        value = poll()
        if value is None and limit:
            now = time.perf_counter()
            if scorer.serving():
                unserved_since = now
            elif now - unserved_since >= limit:
                return {"gave_up": _absent(scorer, limit)}
        return value

    while (value := on_rank0(ask)) is None:
        if controller.is_rank0 and time.perf_counter() - last >= note_every:
            last = time.perf_counter()
            controller.log(_waiting_note(scorer))
        time.sleep(poll_s)
    if "gave_up" in value:
        if give_up:
            controller.log(f"[background] {value['gave_up']}")
            return None
        raise BackgroundWaitError(value["gave_up"])
    return value


def train_stage(controller, stage: int) -> Selection:
    """Train stage ``stage`` while its scoring and selection run in the background; its selection."""
    if controller.groups.world_size != 1 and not _external(controller.cfg):
        raise RunInputError(f"curriculum.background_scoring: true with curriculum.background_scorer child needs one "
                            f"process (the scorer runs beside it), not a world of {controller.groups.world_size}: "
                            "set curriculum.background_scorer external and launch `cropi serve-scoring`")
    pool, select_step = controller.prompts.pool, f"stage{stage}/select"
    if controller.is_done(select_step):
        selection = steps.read_selection(controller.layout.selection(stage))
        switch = StageSwitch(pool, selection=selection,
                             switch_step=controller.state.info(select_step).get("switch_step"))
        controller.step_train(stage, switch=switch)
        _record_probe(controller, stage, None)
        return selection
    scorer = _submit(controller, stage)
    forced = os.environ.get(SWITCH_AT_ENV)

    def on_ready(result: dict, step: int) -> Selection:
        t0 = time.perf_counter()
        scorer.seconds = result["background_seconds"]  # every rank's handle: only rank 0 polled it
        selection = _record(controller, stage, result, step)
        controller.charge("selection", time.perf_counter() - t0)
        fault_point("background:switch")
        prestart(controller, stage + 1)  # the next background stage's scorer loads while this one trains
        return selection

    start = stage * controller.cfg.curriculum.steps_per_stage
    switch = StageSwitch(pool, scorer=scorer, on_ready=on_ready, switch_at=start + int(forced) if forced else None,
                         wait=lambda: _wait_together(controller, scorer, scorer.poll))
    controller.step_train(stage, switch=switch)
    if switch.selection is None:  # the stage ended first: what the scorer still needs delays the next stage
        t0 = time.perf_counter()
        result = _wait_together(controller, scorer, scorer.poll)
        scorer.seconds = result["background_seconds"]
        controller.charge("scoring", time.perf_counter() - t0)
        switch.selection = _record(controller, stage, result, None)
    _record_probe(controller, stage, scorer)
    controller.background_scorers.pop(stage).kill()
    controller.prune_features()
    return switch.selection
