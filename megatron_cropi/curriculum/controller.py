"""The CROPI stage controller: ``cropi run CONFIG``.

    warm-up (synthetic suite only) → behaviour rollouts by β, once (pool and target sets)
    for stage m:  score at θ_m  →  select  →  GRPO for T steps  →  checkpoint θ_{m+1}  →  report

Every step leaves files under ``run.output_dir`` and is recorded in ``state.json``; a restarted run
skips each step whose outputs exist and validate, and resumes GRPO from its last checkpoint (the data
position and RNG come back with it), so the final selections and parameters equal an uninterrupted
run's. ``CROPI_FAULT_AT=<point>`` makes the process die at a named point (tests of resume).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist

from megatron_cropi.curriculum.runtime import PolicyRuntime, setup_run
from megatron_cropi.curriculum.state import RunState
from megatron_cropi.curriculum import steps as S

__all__ = ["StageController", "run_curriculum", "fault_point"]


def fault_point(name: str) -> None:
    """Die here, as a SIGKILL would, if ``CROPI_FAULT_AT`` names this point (injected faults only)."""
    if os.environ.get("CROPI_FAULT_AT") == name:
        os._exit(17)


class StageController:
    """Runs (or resumes) the curriculum of one run config.

    Args:
        cfg: the :class:`~megatron_cropi.config.schema.RunConfig`.
        new_run: start over in ``run.output_dir`` even if the config changed (old outputs are moved aside).
        log: a ``print``-like function (called on global rank 0).
    """

    def __init__(self, cfg, *, new_run: bool = False, log=print):
        from megatron_cropi.metrics import MetricsLogger

        self.cfg, self.out = cfg, Path(cfg.run.output_dir)
        self.groups, self.prompts, self.tokenizer = setup_run(cfg)
        self.rank0 = self.groups.rank == 0
        self._log = log
        self.state = self._open_state(new_run)
        self.metrics = MetricsLogger(self.out / "tensorboard", enabled=self.groups.is_metrics_rank)
        self.rt: PolicyRuntime | None = None

    def log(self, msg: str) -> None:
        if self.rank0:
            self._log(msg)

    def _open_state(self, new_run: bool) -> RunState:
        box = [None]
        if self.rank0:
            try:
                box[0] = RunState.open(self.out, self.cfg.to_dict(), new_run=new_run)
            except Exception as err:  # every rank must stop, not only rank 0
                box[0] = err
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0] if self.rank0 else RunState(self.out / "state.json", box[0].data)

    def add_clock(self, phase: str, seconds: float) -> None:
        """Charge ``seconds`` of method work (rollouts, scoring, selection, training) to the run's clock,
        the wall-clock axis of the curriculum benchmark (evaluation time is not charged)."""
        clock = self.state.data.setdefault("clock", {})
        clock[phase] = clock.get(phase, 0.0) + float(seconds)

    @property
    def clock_seconds(self) -> float:
        return float(sum(self.state.data.get("clock", {}).values()))

    def _done(self, step: str) -> bool:
        return self.state.is_done(step)

    def _mark(self, name: str, **info) -> None:
        if self.rank0:
            self.state.mark_done(name, info)
        else:
            self.state.data["done"].append(name)

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run every remaining step; return the final summary (also written to ``summary.json``)."""
        cc = self.cfg.curriculum
        t0 = time.perf_counter()
        beta_dir = self.step_warmup()
        self.rt = rt = PolicyRuntime(self.cfg, self.groups, self.tokenizer, hf_dir=beta_dir,
                                     total_steps=cc.total_steps, metrics=self.metrics)
        try:
            self.step_behaviour_rollouts()
            self.resume_training()
            for m in range(cc.stages):
                if self._done(f"stage{m}/report"):
                    continue
                features = self.step_score(m)
                self.step_probe(m, features)
                selection = self.step_select(m, features)
                self.step_train(m, selection)
                self.step_report(m, selection, features)
            return self.finish(time.perf_counter() - t0)
        finally:
            rt.close()

    # -- steps ----------------------------------------------------------------------------------------
    def step_warmup(self) -> str | None:
        """The β policy's HF directory: the warm-up's, ``rollout.checkpoint``, or None (random init)."""
        cfg = self.cfg
        if not cfg.curriculum.warmup.enabled:
            return cfg.rollout.checkpoint or None
        out = self.out / "warmup" / "hf"
        if self._done("warmup") and (out / "config.json").exists():
            return str(out)
        from megatron_cropi.curriculum.warmup import run_warmup

        info = run_warmup(cfg, self.groups, self.tokenizer, self.prompts, out, metrics=self.metrics, log=self.log)
        self.log(f"[warmup] done: {info['steps']} steps, greedy target accuracy {info['greedy_val']:.3f}, "
                 f"{info['seconds']:.0f} s")
        self._mark("warmup", **{k: v for k, v in info.items() if k != "history"})
        return str(out)

    def step_behaviour_rollouts(self) -> None:
        """K responses per pool and target prompt from β (the policy before any GRPO step), once."""
        if self._done("rollouts"):
            return
        if self.cfg.selection.policy in ("full", "random"):
            self._mark("rollouts", skipped=f"policy {self.cfg.selection.policy} needs no behaviour rollouts")
            return
        if self.rt.trainer.step_count:
            raise RuntimeError("behaviour rollouts must come from β, but the policy has already been trained")
        cc = self.cfg.curriculum
        for name, prompts, n in [("pool", self.prompts.pool, cc.pool_samples)] + [
                (f"target-{t}", recs, cc.target_samples) for t, recs in sorted(self.prompts.targets.items())]:
            t0 = time.perf_counter()
            summary = S.behaviour_rollouts(self, name, prompts, n)
            self.add_clock("rollouts", time.perf_counter() - t0)
            self.log(f"[rollouts] {name}: {len(prompts)} prompts, pass rate {summary.pass_rate:.3f}, "
                     f"{summary.zero_variance_groups} zero-variance groups")
            fault_point(f"rollouts:{name}")
        self._mark("rollouts")

    def resume_training(self) -> None:
        """Load the latest GRPO checkpoint (if any) with its stage's prompt set for the data position."""
        from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint, read_checkpoint_meta

        ckpt = latest_checkpoint(self.out / "checkpoints")
        if ckpt is None:
            return
        step = int(read_checkpoint_meta(ckpt)["step"])
        T = max(self.cfg.curriculum.steps_per_stage, 1)
        stage = max(step - 1, 0) // T
        sel = S.load_selection(self, stage)
        if sel is not None:
            self.rt.trainer.set_prompts(S.selected_prompts(self, sel))
        self.rt.trainer.load(ckpt)
        S.truncate_eval_log(self, step)
        self.log(f"[resume] from {ckpt.name} (step {step}, stage {stage})")

    def step_score(self, m: int) -> dict:
        """Projected POPI gradients of the pool and the target sets at θ_m."""
        return S.score_stage(self, m)

    def step_probe(self, m: int, features: dict) -> None:
        """Projection quality on a probe set at θ_m (the checkpoint the features were made at)."""
        from megatron_cropi.curriculum.report import probe_projection_quality

        if self._done(f"stage{m}/probe"):
            return
        probe = probe_projection_quality(self, m, features) if features else {"skipped": "policy is not cropi"}
        self._mark(f"stage{m}/probe", **probe)

    def step_select(self, m: int, features: dict):
        return S.select_stage(self, m, features)

    def step_train(self, m: int, selection) -> None:
        """GRPO for ``steps_per_stage`` steps on the selection; state after every step."""
        if self._done(f"stage{m}/train"):
            return
        S.train_stage(self, m, selection)
        self._mark(f"stage{m}/train", step=self.rt.trainer.step_count)

    def step_report(self, m: int, selection, features: dict) -> None:
        S.report_stage(self, m, selection, features)
        self._mark(f"stage{m}/report")

    def finish(self, seconds: float) -> dict:
        """Export the final policy to ``final_hf/`` (HF format) and write the run summary."""
        from megatron_cropi.checkpoint import save_model_as_hf
        from megatron_cropi.curriculum.report import write_final_report

        if not (self.out / "final_hf" / "config.json").exists() or not self._done("final_hf"):
            save_model_as_hf(self.rt.trainer.ddp, self.groups, self.cfg.model, self.out / "final_hf", overwrite=True)
            self._mark("final_hf")
        summary = write_final_report(self, seconds) if self.rank0 else {}
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        self.metrics.flush()
        return box[0]


def run_curriculum(cfg, *, new_run: bool = False, log=print) -> dict:
    """``cropi run CONFIG``: run or resume the whole curriculum."""
    return StageController(cfg, new_run=new_run, log=log).run()
