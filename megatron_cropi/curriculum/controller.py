"""The CROPI stage controller: ``cropi run CONFIG``.

    warm-up (synthetic suite only) → behaviour rollouts by β, once (pool and target sets)
    for stage m:  score at θ_m  →  probe  →  select  →  GRPO for T steps  →  checkpoint θ_{m+1}  →  report

``selection.policy: online_learnability`` replaces β's rollouts and the scoring by a roll-out of the
pool at θ_m before each selection (charged as ``selection``). ``curriculum.background_scoring`` moves a
stage's scoring, probe and selection into a background process while the stage trains on the whole pool
(:mod:`.background_stage`), and ``background_rollouts`` the behaviour rollouts it scores too.
``curriculum.refresh_behaviour_every: M`` re-rolls the behaviour sets at θ_m every M stages (before that
stage's scoring); stages score the newest refresh. Stages past ``curriculum.selected_stages`` train on the
whole pool, and those ``curriculum.select_every`` makes hold an earlier selection: no refresh or scoring.

Every step leaves files under ``run.output_dir`` (their paths: :class:`~megatron_cropi.layout.RunLayout`)
and is recorded in ``state.json``; a restarted run skips each step recorded as done, and resumes GRPO
from its last checkpoint (the data position and RNG come back with it), so the final selections and
parameters equal an uninterrupted run's. The controller owns the run's state, its clock and its fault
points; the steps' bodies (:mod:`.steps`, :mod:`.probe`, :mod:`.report`) get values and return values.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path

from megatron_cropi.curriculum import background_stage, behaviour, external, steps
from megatron_cropi.curriculum.evaluate import EVAL_SEED_OFFSET, EvalLog, eval_line, evaluate_runtime
from megatron_cropi.curriculum.faults import fault_point
from megatron_cropi.curriculum.probe import probe_projection_quality
from megatron_cropi.curriculum.report import policy_label, publish_stage_report, write_final_report
from megatron_cropi.curriculum.resume import resume_training
from megatron_cropi.curriculum.reuse import reuse_sources
from megatron_cropi.curriculum.state import RunState
from megatron_cropi.influence.feature_store import prune_feature_stores
from megatron_cropi.influence.stores import PolicyScorer
from megatron_cropi.layout import RunLayout
from megatron_cropi.metrics import MetricsLogger
from megatron_cropi.selection.policies import Selection, SelectionConfig, uses_behaviour_rollouts
from megatron_cropi.utils.rank_zero import on_rank0, share_from_rank0
from megatron_cropi.wiring import PolicyRuntime, policy_identity, setup_run

__all__ = ["StageController", "run_curriculum"]


class StageController:
    """Runs (or resumes) the curriculum of one run config.

    Args:
        cfg: the :class:`~megatron_cropi.run_config.RunConfig`.
        new_run: start over in ``run.output_dir`` even if the config changed (old outputs are moved aside).
        log: a ``print``-like function (called on global rank 0).
    """

    def __init__(self, cfg, *, new_run: bool = False, log=print):
        from megatron_cropi.projection.config import build_projector

        self.cfg, self.layout = cfg, RunLayout(cfg.run.output_dir)
        self.groups, self.prompts, self.tokenizer = setup_run(cfg)
        self.is_rank0 = self.groups.rank == 0
        self._print = log
        self.state = self._open_state(new_run)
        self.metrics = MetricsLogger(self.layout.tensorboard, enabled=self.groups.is_metrics_rank)
        self.eval_log = EvalLog(self.layout.eval_log)
        self.projector = build_projector(cfg.projection) if cfg.selection.policy == "cropi" else None
        self.runtime: PolicyRuntime | None = None
        self.background_scorers: dict = {}  # stage -> its BackgroundScorer (curriculum.background_scoring)

    def log(self, msg: str) -> None:
        if self.is_rank0:
            self._print(msg)

    def _open_state(self, new_run: bool) -> RunState:
        state = on_rank0(lambda: RunState.open(self.layout.root, self.cfg.to_dict(), new_run=new_run))
        return state if self.is_rank0 else RunState(self.layout.state, state.data)

    # -- run state: done steps and the run clock ----------------------------------------------------
    def is_done(self, step: str) -> bool:
        return self.state.is_done(step)

    def mark_done(self, name: str, /, **info) -> None:
        """Record step ``name`` as finished with what it reported (rank 0 writes ``state.json``)."""
        if self.is_rank0:
            self.state.mark_done(name, info)
        else:
            self.state.data["done"].append(name)

    def charge(self, phase: str, seconds: float, *, background: bool = False) -> None:
        """Charge ``seconds`` of method work (rollouts, scoring, selection, training) to the run's clock,
        the wall-clock axis of the curriculum benchmark (evaluation time is not charged); ``background``:
        to ``background_clock``, work done beside training that delayed no step."""
        clock = self.state.data.setdefault("background_clock" if background else "clock", {})
        clock[phase] = clock.get(phase, 0.0) + float(seconds)

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run every remaining step; return the final summary (also written to ``summary.json``)."""
        curriculum = self.cfg.curriculum
        t0 = time.perf_counter()
        beta_dir = self.step_warmup()
        try:
            background_stage.prestart(self)  # the scorer loads while the policy is built (and β rolls out)
            self.runtime = PolicyRuntime(self.cfg, self.groups, self.tokenizer, hf_dir=beta_dir,
                                         total_steps=curriculum.total_steps, metrics=self.metrics,
                                         checkpoint_dir=self.layout.checkpoints)
            self.step_behaviour_rollouts()
            resume_training(self)
            for stage in range(curriculum.stages):
                if self.is_done(f"stage{stage}/report"):
                    continue
                self.step_refresh_behaviour(stage)  # a refresh stage never holds (config)
                if curriculum.held_from(stage) is not None:  # curriculum.select_every: an earlier selection again
                    selection = self.step_select(stage, {}, None, held_from=curriculum.held_from(stage))
                    self.step_train(stage, selection)
                elif background_stage.uses_background(self.cfg, stage):
                    selection = background_stage.train_stage(self, stage)
                else:
                    features = self.step_score(stage)
                    self.step_probe(stage, features)
                    selection = self.step_select(stage, features, self.step_online_rollouts(stage))
                    self.prune_features()
                    self.step_train(stage, selection)
                self.step_report(stage, selection)
            self.prune_features()
            summary = self.finish(time.perf_counter() - t0)
            background_stage.stop_all(self, finished=True)  # an external scoring job may stop now
            return summary
        finally:
            background_stage.stop_all(self)
            if self.runtime is not None:
                self.runtime.close()

    # -- steps ----------------------------------------------------------------------------------------
    def step_warmup(self) -> str | None:
        """The β policy's HF directory: the warm-up's, ``rollout.checkpoint``, or None (random init)."""
        cfg = self.cfg
        if not cfg.curriculum.warmup.enabled:
            return cfg.rollout.checkpoint or None
        if self.is_done("warmup") and (self.layout.warmup_hf / "config.json").exists():
            return str(self.layout.warmup_hf)
        from megatron_cropi.curriculum.warmup import run_warmup

        info = run_warmup(cfg, self.groups, self.tokenizer, self.prompts, self.layout.warmup_hf,
                          metrics=self.metrics, log=self.log)
        self.log(f"[warmup] done: {info['steps']} steps, greedy target accuracy {info['greedy_val']:.3f}, "
                 f"{info['seconds']:.0f} s")
        self.mark_done("warmup", **{k: v for k, v in info.items() if k != "history"})
        return str(self.layout.warmup_hf)

    def behaviour_store(self, stage: int, name: str) -> Path:
        """The trajectory store of set ``name`` that stage ``stage`` scores: β's, or the newest refresh's."""
        refreshed = behaviour.refresh_stage_of(stage, self.cfg.curriculum.refresh_behaviour_every)
        return self.layout.stage_rollouts(refreshed, name) if refreshed else self.layout.rollouts(name)

    def _roll_out_behaviour(self, stage: int, policy: str) -> None:
        """Roll every behaviour set out with the current policy (β at stage 0) into its stage's stores."""
        cfg, runtime = self.cfg, self.runtime

        def done(label: str, prompts: list, summary, seconds: float) -> None:
            self.charge("rollouts", seconds)
            self.log(behaviour.rollouts_line(label, prompts, summary))

        behaviour.roll_out_sets(behaviour.run_behaviour_sets(cfg, self.prompts),
                                lambda name: self.behaviour_store(stage, name), stage=stage, base=runtime.sampling,
                                curriculum=cfg.curriculum, rollout=cfg.rollout, engine=runtime.engine,
                                reward_fn=runtime.reward_fn, tokenizer=self.tokenizer, groups=self.groups,
                                policy=policy, on_set=done, log=self.log, reuse_from=reuse_sources(
                                    cfg.run.output_dir, cfg.curriculum.reuse_rollouts_from) if stage == 0 else ())

    def step_behaviour_rollouts(self) -> None:
        """K responses per pool and target prompt from β (the policy before any GRPO step), once."""
        if self.is_done("rollouts") or background_stage.rolls_out(self.cfg, 0):  # or stage 0's scorer makes them
            return
        cfg, runtime = self.cfg, self.runtime
        if not uses_behaviour_rollouts(cfg.selection.policy):
            self.mark_done("rollouts", skipped=f"policy {cfg.selection.policy} needs no behaviour rollouts")
            return
        if runtime.trainer.step_count:
            raise RuntimeError("behaviour rollouts must come from β, but the policy has already been trained")
        self._roll_out_behaviour(0, self.policy_identity())
        self.mark_done("rollouts")

    def step_refresh_behaviour(self, stage: int) -> None:
        """``curriculum.refresh_behaviour_every``: at a refresh stage m, the behaviour sets rolled out again
        by θ_m (into ``rollouts/stage{m}/``), so that stage's POPI is on-policy."""
        step = background_stage.rollouts_step(stage)
        if not behaviour.is_refresh_stage(stage, self.cfg.curriculum.refresh_behaviour_every) or self.is_done(step) \
                or not uses_behaviour_rollouts(self.stage_selection(stage).policy) \
                or background_stage.rolls_out(self.cfg, stage):  # the stage's scorer rolls out
            return
        self.require_stage_start(stage, "behaviour refresh")
        t0, trainer_step = time.perf_counter(), self.runtime.trainer.step_count
        self._roll_out_behaviour(stage, f"{self.policy_identity()}+grpo-step{trainer_step}")
        self.mark_done(step, seconds=time.perf_counter() - t0, policy_step=trainer_step)

    def stage_selection(self, stage: int) -> SelectionConfig:  # the whole pool past curriculum.selected_stages
        return steps.stage_selection(self.cfg.selection, self.cfg.curriculum.selects(stage))

    def require_stage_start(self, stage: int, what: str) -> None:
        """Raise unless the policy is θ_stage, the checkpoint stage ``stage`` starts from."""
        start = stage * self.cfg.curriculum.steps_per_stage
        if self.runtime.trainer.step_count != start:
            raise RuntimeError(f"stage {stage}'s {what} must come from θ_{stage} (step {start}), but the policy "
                               f"is at step {self.runtime.trainer.step_count}")

    def policy_identity(self) -> str:
        """β's identity for store headers: hashed once, on global rank 0 (it reads every weight file)."""
        if not hasattr(self, "_beta_identity"):
            self._beta_identity = share_from_rank0(
                policy_identity(self.cfg, self.runtime.hf_dir) if self.is_rank0 else None)
        return self._beta_identity

    def scorer(self) -> PolicyScorer:
        """The policy as it is now, ready to score stored trajectories."""
        cfg, runtime = self.cfg, self.runtime
        return PolicyScorer(runtime.model, self.groups, self.projector, cfg.scoring, projection_seed=cfg.projection.seed,
                            checkpoint_step=runtime.trainer.step_count, pad_id=runtime.pad_id,
                            progress=cfg.rollout.progress)

    def step_score(self, stage: int) -> dict[str, Path]:
        """Projected POPI gradients of the pool and the target sets at θ_m; ``{set: feature store}``."""
        if self.stage_selection(stage).policy != "cropi":
            return {}
        names = steps.feature_set_names(self.prompts.targets, guard=self.cfg.selection.guard.source == "check")
        paths = {name: self.layout.features(stage, name) for name in names}
        todo = [name for name in names if not self.is_done(f"stage{stage}/score/{name}")]
        scorer = self.scorer() if todo else None
        for name in todo:
            t0, sharded = time.perf_counter(), name == "pool" and self.cfg.scoring.scale_out
            stats = steps.score_set(self.behaviour_store(stage, name), paths[name], scorer, sharded=sharded,
                                    shortlist=self.pool_shortlist(stage) if name == "pool" and not sharded else None,
                                    on_unit=lambda: fault_point("score:chunk"))
            self.log(steps.score_line(stage, name, stats))
            self.charge("scoring", time.perf_counter() - t0)
            self.mark_done(f"stage{stage}/score/{name}", **dataclasses.asdict(stats))
        return paths

    def pool_shortlist(self, stage: int):
        """``scoring.shortlist``: which pool rows stage ``stage`` scores, from the carried ranking of the
        stage before (rank 0 reads it; every rank gets the same)."""
        if self.cfg.scoring.shortlist.scores_everything(stage):
            return None
        carried = share_from_rank0(steps.read_ranking(self.layout, stage - 1) if self.is_rank0 else None)
        return steps.pool_shortlist(self.cfg.scoring.shortlist, stage, carried, seed=self.cfg.run.seed,
                                    budget=int(self.cfg.selection.ratio * len(self.prompts.pool)))

    def step_probe(self, stage: int, features: dict[str, Path]) -> None:
        """Projection quality on a probe set at θ_m (the checkpoint the features were made at)."""
        if self.is_done(f"stage{stage}/probe"):
            return
        curriculum = self.cfg.curriculum
        stores, t0 = {name: self.behaviour_store(stage, name) for name in features}, time.perf_counter()
        skipped = "policy is not cropi" if curriculum.selects(stage) else "whole-pool stage (curriculum.selected_stages)"
        probe = (probe_projection_quality(stage, features, self.scorer(), stores=stores,
                                          probe_prompts=curriculum.probe_prompts, max_params=curriculum.probe_max_params,
                                          max_target_prompts=self.cfg.selection.max_target_prompts,
                                          seed=self.cfg.run.seed) if features else {"skipped": skipped})
        self.mark_done(f"stage{stage}/probe", **probe, seconds=time.perf_counter() - t0)  # reported, not charged

    def step_online_rollouts(self, stage: int) -> Path:
        """``online_learnability``: ``curriculum.online_samples`` responses per pool prompt (or a random
        ``online_pool_fraction`` of the pool) from θ_m at GRPO's sampling, into ``rollouts/stage{m}/pool``;
        their pass rates are the selection's. Other policies (and whole-pool stages): the stage's behaviour
        pool store (which may not exist)."""
        cfg, curriculum = self.cfg, self.cfg.curriculum
        if self.stage_selection(stage).policy != "online_learnability":
            return self.behaviour_store(stage, "pool")
        path, step = self.layout.stage_rollouts(stage, "pool"), f"stage{stage}/online_rollouts"
        if self.is_done(step):
            return path
        runtime = self.runtime
        self.require_stage_start(stage, "pool rollouts")
        prompts = behaviour.online_pool_subset(self.prompts.pool, curriculum.online_pool_fraction, seed=cfg.run.seed,
                                               m=stage)
        t0 = time.perf_counter()
        summary = behaviour.online_pool_rollouts(
            stage, prompts, path, samples=curriculum.online_samples, base=runtime.sampling, rollout=cfg.rollout,
            engine=runtime.engine, reward_fn=runtime.reward_fn, tokenizer=self.tokenizer, groups=self.groups,
            policy=f"{self.policy_identity()}+grpo-step{runtime.trainer.step_count}")
        seconds = time.perf_counter() - t0
        self.charge("selection", seconds)
        self.log(behaviour.online_line(stage, prompts, curriculum.online_samples, summary, seconds))
        fault_point("online_rollouts")
        # this call's prompts (not a resumed store's earlier ones); the selection summary has the whole store's
        self.mark_done(step, prompts=len(prompts), rolled_out=summary.prompts_rolled_out, pass_rate=summary.pass_rate,
                       zero_variance_groups=summary.zero_variance_groups, seconds=seconds)
        return path

    def step_select(self, stage: int, features: dict[str, Path], pool_rollouts: Path | None, *,
                    held_from: int | None = None) -> Selection:
        """The stage's prompts (``selections/stage{m}.json``) from ``features`` and the pass rates of
        the trajectory store ``pool_rollouts``; ``held_from`` (``curriculum.select_every``): that stage's again."""
        step = f"stage{stage}/select"
        if self.is_done(step):
            done = on_rank0(lambda: steps.read_selection(self.layout.selection(stage)))
            if done is not None:
                return done
        t0 = time.perf_counter()
        selection = (steps.hold_selection(self.layout, stage, held_from) if held_from is not None else
                     steps.select_stage(stage, layout=self.layout, pool=self.prompts.pool, cfg=self.stage_selection(stage),
                                        seed=self.cfg.run.seed, features=features, pool_rollouts=pool_rollouts))
        self.charge("selection", time.perf_counter() - t0)
        fault_point("select")
        self.log(steps.select_line(stage, selection))
        self.mark_done(step, seconds=selection.summary["seconds"], held_from=held_from)
        return selection

    def prune_features(self) -> None:
        """``curriculum.keep_features: resume``: delete every stage's feature stores whose selection is
        recorded (all of them, when called after a selection). Idempotent, so a run that died mid-prune
        or right after marking a selection finishes the job on its next pass."""
        if self.cfg.curriculum.keep_features != "resume":
            return
        freed = on_rank0(lambda: prune_feature_stores(self.layout.features_root, keep_stages=set()))
        if freed:
            self.log(f"[features] deleted {freed / 2**20:.1f} MiB of feature stores (curriculum.keep_features: resume)")

    def step_train(self, stage: int, selection: Selection | None = None, *, switch=None) -> None:
        """GRPO steps ``m·T .. (m+1)·T`` of stage m on the selection; state after every step; checkpoint at the
        end. ``switch`` (a background stage's :class:`~.background_stage.StageSwitch`): the stage starts on
        its prompts, changes them when it says, and its scorer is paused while evaluating."""
        if self.is_done(f"stage{stage}/train"):
            return
        if self.cfg.curriculum.trainer.kind == "external":  # the user's command trains it (curriculum/external.py)
            return external.train_stage(self, stage, selection)
        curriculum, trainer = self.cfg.curriculum, self.runtime.trainer
        start, end = stage * curriculum.steps_per_stage, (stage + 1) * curriculum.steps_per_stage
        if trainer.step_count == start:
            trainer.set_prompts(switch.prompts_at(start) if switch else steps.selected_prompts(self.prompts.pool, selection))
        elif not start < trainer.step_count <= end:
            raise RuntimeError(f"stage {stage} covers steps {start}..{end}, but the policy is at step {trainer.step_count}")
        paused = switch.paused if switch else nullcontext
        due = lambda step: step == 0 or step % curriculum.eval.every == 0 or step == curriculum.total_steps  # noqa: E731
        if due(trainer.step_count):  # step 0, or a resumed checkpoint whose evaluation the killed run never made
            with paused():
                self.evaluate()
        t0 = time.perf_counter()
        while trainer.step_count < end:
            if switch and (prompts := switch.before_step(trainer.step_count)):
                trainer.set_prompts(prompts)
            t_step = time.perf_counter()
            metrics = trainer.step()
            self.charge("training", time.perf_counter() - t_step)
            fault_point("train:step")
            if self.is_rank0:
                self.state.update(train_step=trainer.step_count, stage=stage)
            if due(trainer.step_count):
                with paused():
                    self.evaluate()
            if trainer.step_count % 10 == 0:
                self.log(f"[train] step {trainer.step_count}: reward {metrics.get('reward', float('nan')):.3f}")
        last = trainer.save_unless_current()
        self.log(f"[train] stage {stage} done at step {trainer.step_count} ({time.perf_counter() - t0:.1f} s) -> {last.name}")
        self.mark_done(f"stage{stage}/train", step=trainer.step_count)

    def evaluate(self) -> dict:
        """Target and check-set accuracy now, logged to TensorBoard and ``metrics/eval.jsonl`` (once per step)."""
        step = self.runtime.trainer.step_count
        done = on_rank0(lambda: self.eval_log.at_step(step))
        if done is not None:
            return done
        rec = evaluate_runtime(self.runtime, self.groups, self.prompts, self.cfg.curriculum.eval,
                               seed=self.cfg.run.seed + EVAL_SEED_OFFSET)
        rec["clock_seconds"] = float(sum(self.state.data.get("clock", {}).values()))  # the run clock so far
        rec["background_seconds"] = background_stage.background_seconds(self.state.data.get("background_clock", {}),
                                                                        self.background_scorers.values())
        self.metrics.log(step, {k: v for k, v in rec.items() if isinstance(v, float)}, prefix="eval")
        on_rank0(lambda: self.eval_log.append(rec))
        self.log(eval_line(rec))
        return rec

    def step_report(self, stage: int, selection: Selection) -> None:
        """``reports/stage{m}.{json,md}`` (rank 0) and the stage's influence metrics (the metrics rank)."""
        publish_stage_report(stage, selection, layout=self.layout, step_info=self.state.data.get("info", {}),
                             steps_per_stage=self.cfg.curriculum.steps_per_stage, metrics=self.metrics)
        self.mark_done(f"stage{stage}/report")

    def finish(self, seconds: float) -> dict:
        """Export the final policy to ``final_hf/`` (HF format) and write the run summary."""
        from megatron_cropi.checkpoint import save_model_as_hf

        cfg, curriculum = self.cfg, self.cfg.curriculum
        exported = on_rank0(lambda: (self.layout.final_hf / "config.json").exists())
        if not exported or not self.is_done("final_hf"):
            save_model_as_hf(self.runtime.trainer.ddp, self.groups, cfg.model, self.layout.final_hf, overwrite=True)
            self.mark_done("final_hf")
        label = policy_label(cfg.selection.policy, curriculum.selected_stages, curriculum.stages,
                             select_every=curriculum.select_every)
        summary = on_rank0(lambda: write_final_report(
            self.layout, self.state.data.get("info", {}), seconds=seconds, policy=label,
            stages=curriculum.stages, steps_per_stage=curriculum.steps_per_stage,
            target_family=self.prompts.target_family, plot=curriculum.plot))
        self.metrics.flush()
        return summary


def run_curriculum(cfg, *, new_run: bool = False, log=print) -> dict:
    """``cropi run CONFIG``: run or resume the whole curriculum."""
    return StageController(cfg, new_run=new_run, log=log).run()
