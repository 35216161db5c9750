"""Configuration of a CROPI curriculum run (``curriculum:`` in the run config).

    curriculum:
      stages: 6                 # selections
      steps_per_stage: 50       # GRPO steps on each stage's subset
      pool_samples: 8           # behaviour rollouts per pool prompt (K)
      target_samples: 8         # behaviour rollouts per target prompt
      warmup: {enabled: true, max_steps: 3000, stop_at_greedy: 0.2}
      eval: {every: 25, samples: 4}
      trainer: {kind: native}   # or external: your trainer's command runs each stage (curriculum/external.py)
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from megatron_cropi.config.loader import require

__all__ = ["WarmupConfig", "EvalConfig", "TrainerConfig", "CurriculumConfig", "COMMAND_PLACEHOLDERS"]

# What an external stage's command may name; ``checkpoint_out`` may name ``stage`` and ``output_dir``.
COMMAND_PLACEHOLDERS = ("selection_parquet", "selection_jsonl", "checkpoint_in", "checkpoint_out", "stage")


@dataclass(frozen=True, kw_only=True)
class WarmupConfig:
    """Supervised warm-up of a from-scratch policy on the synthetic suite (the CPU default's β)."""

    enabled: bool = False
    """Run the warm-up (synthetic data only; real models arrive instruction-tuned)."""
    max_steps: int = 3000
    """Give up after this many steps even if the target accuracy was not reached."""
    min_steps: int = 0
    """Never stop before this many steps."""
    batch_size: int = 64
    """Fresh random prompts (+ answers) per step."""
    lr: float = 1e-3
    """AdamW learning rate (constant)."""
    eval_every: int = 100
    """Check the target accuracy every this many steps."""
    stop_at_greedy: float = 0.2
    """Stop once greedy accuracy on the target-gradient ("val") set reaches this (the warm-up has a
    sharp phase transition: fixed step counts overshoot or undershoot it)."""

    def __post_init__(self):
        require(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        require(0 <= self.min_steps <= self.max_steps, "min_steps", self.min_steps, "must be in [0, max_steps]")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(0 < self.lr < 1, "lr", self.lr, "must be in (0, 1)")
        require(self.eval_every >= 1, "eval_every", self.eval_every, "must be >= 1")
        require(0 <= self.stop_at_greedy <= 1, "stop_at_greedy", self.stop_at_greedy, "must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation during the curriculum: target accuracy against step, and the untargeted check set."""

    every: int = 25
    """Evaluate every this many GRPO steps (and at step 0 and the end)."""
    samples: int = 4
    """Samples per test prompt for the sampled pass rate (the headline metric)."""
    temperature: float = 1.0
    """Temperature of the sampled pass rate."""
    greedy: bool = True
    """Also report greedy accuracy on the test set."""
    check: bool = True
    """Also report greedy accuracy on the untargeted check set."""
    max_prompts: int = 0
    """Evaluate at most this many prompts per set, evenly spaced over it so every source is in (0: all)."""

    def __post_init__(self):
        require(self.every >= 1, "every", self.every, "must be >= 1")
        require(self.samples >= 1, "samples", self.samples, "must be >= 1")
        require(0 < self.temperature <= 10, "temperature", self.temperature, "must be in (0, 10]")
        require(self.max_prompts >= 0, "max_prompts", self.max_prompts, "must be >= 0")


def _placeholders(template: str) -> set[str] | None:
    """The ``{name}`` fields of a format string, or None when it is not one."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:
        return None


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Who trains each stage: this package's GRPO (``native``), or a command of yours (``external``).

    ``external`` (:mod:`.external`): each stage runs ``command`` (a shell string) with the placeholders
    ``{selection_parquet}`` / ``{selection_jsonl}`` (the stage's selection as verl / slime dataset),
    ``{checkpoint_in}`` (the HF directory of θ_m to start from), ``{checkpoint_out}`` (where the stage's
    HF checkpoint θ_{m+1} must appear) and ``{stage}``; the controller checks that checkpoint and scores
    the next stage at it."""

    kind: Literal["native", "external"] = "native"
    """``native``: GRPO steps in this process; ``external``: ``command`` per stage."""
    command: str = ""
    """The stage's training command (external), e.g. ``bash train.sh {selection_parquet} {checkpoint_in}
    {checkpoint_out}``; runs in a shell, in the directory ``cropi run`` was started from."""
    checkpoint_out: str = ""
    """Where stage ``{stage}``'s HF checkpoint must appear (``{stage}`` and ``{output_dir}`` filled in);
    default ``{output_dir}/external/stage{stage}/hf``."""

    def __post_init__(self):
        require(self.kind in ("native", "external"), "kind", self.kind, "must be native or external")
        if self.kind == "native":
            require(not self.command and not self.checkpoint_out, "command", self.command or self.checkpoint_out,
                    "is only read with kind: external; remove it or set kind: external")
            return
        require(bool(self.command.strip()), "command", self.command, "a shell command when kind is external")
        names = _placeholders(self.command)
        require(names is not None, "command", self.command, "a valid format string (double {{ }} for literal braces)")
        unknown = sorted(names - set(COMMAND_PLACEHOLDERS))
        require(not unknown, "command", self.command, f"only the placeholders {{{'}, {'.join(COMMAND_PLACEHOLDERS)}}} "
                f"(unknown: {unknown})")
        require("checkpoint_out" in names, "command", self.command, "must name {checkpoint_out}: where the stage's "
                "checkpoint has to appear")
        if self.checkpoint_out:
            out = _placeholders(self.checkpoint_out)
            require(out is not None and out <= {"stage", "output_dir"}, "checkpoint_out", self.checkpoint_out,
                    "a path that may name only {stage} and {output_dir}")
            require("stage" in out, "checkpoint_out", self.checkpoint_out,
                    "must name {stage} (each stage's checkpoint needs its own directory)")

    def checkpoint_dir(self, output_dir: str, stage: int) -> str:
        """Stage ``stage``'s HF output directory."""
        template = self.checkpoint_out or "{output_dir}/external/stage{stage}/hf"
        return template.format(output_dir=output_dir, stage=stage)


@dataclass(frozen=True, kw_only=True)
class CurriculumConfig:
    """The stage loop: offline rollouts by β once, then per stage score → select → GRPO."""

    stages: int = 6
    """Number of selections (stages)."""
    steps_per_stage: int = 50
    """GRPO steps trained on each stage's subset."""
    pool_samples: int = 8
    """Behaviour responses per pool prompt (the paper: 8)."""
    target_samples: int = 8
    """Behaviour responses per target prompt (the paper: 32)."""
    behaviour_temperature: float | None = None
    """Sampling temperature of the behaviour rollouts (the paper: 0.5); default ``rollout.temperature``,
    which GRPO's on-policy rollouts use. The stored log-probs follow ``rollout.logprobs``."""
    behaviour_max_tokens: int | None = None
    """Longest behaviour response; default ``rollout.max_tokens``."""
    refresh_behaviour_every: int = 0
    """Re-roll the pool and target sets (behaviour sampling) at the current checkpoint θ_m every this many
    stages (m = M, 2M, ...), into ``rollouts/stage{m}/``; later stages score those (0: never, β's rollouts
    serve every stage). At a refresh stage POPI is on-policy (ρ ≡ 1), and prompts that were all-correct or
    all-wrong under β can return. Its time is charged to the run clock as ``rollouts``."""
    selected_stages: int = 0
    """Stages that train on a selection (``selection``); every later stage trains on the whole pool
    (policy ``full``: no refresh, scoring or selection is made for it). 0: every stage selects. A warm start:
    the influence ranking steers the first stages, where it gains the most steps, and the pool's breadth
    the rest (``benchmarks/curriculum.py``, ``cropi_first1_r10_dynamic``)."""
    select_every: int = 1
    """A selecting stage m makes its own selection (refresh, scoring, probe, selection) when m is a multiple
    of this; the selecting stages between hold the last one: they train on stage m − (m mod this)'s selection
    again (``selections/stage{m}.json`` is its copy) and score nothing. 1: every selecting stage selects.
    With ``background_scoring`` the selection arrives part-way into its stage; a held stage gives it whole
    stages more to train (``benchmarks/curriculum.py``, ``cropi_first2_hold_r10_dynamic_bg``). A refresh
    (``refresh_behaviour_every``) must fall on a stage that selects: a multiple of this. Holding comes before
    ``selection.exclude_previous``, which applies to the stages that select anew."""
    background_scoring: bool = False
    """Score and select each selecting stage off the critical path (``curriculum/background.py``): a
    background process scores β's (or the refresh's) trajectories at θ_m and selects while stage m
    trains on the whole pool; the stage switches to the selection at the first step after it is ready.
    The run clock charges only what still delays training (exporting θ_m, any wait at the stage's end);
    the background work is recorded beside it (``background_clock``). Needs ``selection.policy: cropi``
    and the native trainer; where the scorer runs is ``background_scorer``."""
    background_rollouts: bool = False
    """With ``background_scoring``: the behaviour rollouts a background stage scores (β's at stage 0, a
    refresh's at its stage) are made by its scorer, before it scores, instead of by the run before the stage
    trains. The stage trains on the whole pool from its first step; the rollouts go to ``background_clock``.
    The stores equal the run's own (samples are functions of the seed, prompt and sample index)."""
    background_scorer: str = "child"
    """Where ``background_scoring`` runs: ``child``, a process the run starts beside itself (a one-process
    run: world size 1, TP = PP = 1); ``external``, a scoring job the operator launches on devices of its
    own, any size and layout (``torchrun ... -m megatron_cropi.cli serve-scoring CONFIG``): the run, of any
    size, writes each stage's job under ``background/`` and switches when the job's result is there
    (``curriculum/scoring_service.py``)."""
    background_wait_s: float = 1800.0
    """``background_scorer: external``: how long the run waits at a stage's end for a scoring job that is not
    serving it (no job has taken the stage's job, or the job's heartbeat is older than 30 s) before it stops
    with an error naming the job to launch (its state is saved: the restarted run resumes and asks again).
    A job that is alive and scoring is waited for as long as it takes. 0: wait without a limit."""
    reuse_rollouts_from: str = ""
    """Another run's ``run.output_dir`` whose behaviour stores (``rollouts/<set>``) this run reuses instead of
    rolling out, set by set, when a store is complete and its header equals the one this run would write
    (sampling with seed, tokenizer, β's identity, prompts, reward configuration); a mismatch is logged
    naming the differing fields and the set is rolled out. Stores moved aside by ``--new-run`` are tried
    the same way (``curriculum/reuse.py``). Empty: only those."""
    online_samples: int = 4
    """``selection.policy: online_learnability``: responses per pool prompt sampled from the current policy
    θ_m at every stage (GRPO's sampling: ``rollout.temperature`` and ``rollout.max_tokens``)."""
    online_pool_fraction: float = 1.0
    """``online_learnability``: fraction of the pool rolled out at every stage (a seeded random subset per
    stage); the selection's budget stays ``selection.ratio`` × the whole pool."""
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    """Supervised warm-up before the behaviour rollouts."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""
    plot: bool = True
    """Write a PNG of target accuracy against step."""
    probe_prompts: int = 32
    """Pool prompts whose projected cosines are compared with exact ones in each stage report (0: off)."""
    probe_max_params: int = 5_000_000
    """Skip the probe when the scored parameters exceed this (exact per-prompt gradients are held)."""
    keep_features: Literal["all", "resume"] = "all"
    """Feature stores kept on disk: ``all`` stages' (for analysis), or only what a resume needs
    (``resume``: a stage's stores are deleted once its selection is recorded)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Who trains each stage on its selection (``native`` GRPO, or an ``external`` command)."""

    def __post_init__(self):
        require(1 <= self.stages <= 10_000, "stages", self.stages, "must be between 1 and 10000")
        require(0 <= self.steps_per_stage <= 1_000_000, "steps_per_stage", self.steps_per_stage, "must be >= 0")
        require(2 <= self.pool_samples <= 4096, "pool_samples", self.pool_samples,
                "must be between 2 and 4096 (a group of one has no advantage)")
        require(2 <= self.target_samples <= 4096, "target_samples", self.target_samples, "must be between 2 and 4096")
        if self.behaviour_temperature is not None:
            require(0 < self.behaviour_temperature <= 10, "behaviour_temperature", self.behaviour_temperature,
                    "must be in (0, 10] or null")
        if self.behaviour_max_tokens is not None:
            require(self.behaviour_max_tokens >= 1, "behaviour_max_tokens", self.behaviour_max_tokens,
                    "must be >= 1 or null")
        require(self.refresh_behaviour_every >= 0, "refresh_behaviour_every", self.refresh_behaviour_every,
                "must be >= 0 (0: never)")
        require(0 <= self.selected_stages <= self.stages, "selected_stages", self.selected_stages,
                f"must be between 0 (every stage selects) and stages ({self.stages})")
        require(1 <= self.select_every <= self.stages, "select_every", self.select_every,
                f"must be between 1 (every selecting stage selects) and stages ({self.stages})")
        if self.refresh_behaviour_every:
            require(self.refresh_behaviour_every % self.select_every == 0, "refresh_behaviour_every",
                    self.refresh_behaviour_every, f"must be a multiple of curriculum.select_every ({self.select_every}): "
                    "a refresh at a stage that holds the previous selection would be rolled out and never scored")
        require(2 <= self.online_samples <= 4096, "online_samples", self.online_samples,
                "must be between 2 and 4096 (one response gives no pass-rate variance)")
        require(0 < self.online_pool_fraction <= 1, "online_pool_fraction", self.online_pool_fraction,
                "must be in (0, 1]")
        require(self.probe_prompts >= 0, "probe_prompts", self.probe_prompts, "must be >= 0")
        require(self.probe_max_params >= 0, "probe_max_params", self.probe_max_params, "must be >= 0")
        require(self.keep_features in ("all", "resume"), "keep_features", self.keep_features, "must be all or resume")
        require(self.background_wait_s >= 0, "background_wait_s", self.background_wait_s,
                "must be >= 0 seconds (0: wait without a limit)")
        require(self.background_scoring or not self.background_rollouts, "background_rollouts",
                self.background_rollouts, "needs curriculum.background_scoring: true (the scorer makes the rollouts)")
        require(self.background_scorer in ("child", "external"), "background_scorer", self.background_scorer,
                "must be child (a process beside a one-process run) or external (a scoring job of its own)")

    def selects(self, stage: int) -> bool:
        """Whether stage ``stage`` trains on a selection (``selected_stages``) rather than the whole pool."""
        return self.selected_stages == 0 or stage < self.selected_stages

    def held_from(self, stage: int) -> int | None:
        """The stage whose selection stage ``stage`` trains on again (``select_every``), or None where the
        stage makes its own selection or trains on the whole pool."""
        if not self.selects(stage) or stage % self.select_every == 0:
            return None
        return stage - stage % self.select_every

    @property
    def selecting_stages(self) -> int:
        """How many stages select: ``selected_stages``, or every stage when it is 0."""
        return self.selected_stages or self.stages

    def scoring_stages(self, stages: int | None = None) -> list[int]:
        """The stages (of the first ``stages``, default all) that make their own selection: the selecting
        stages that hold none (``select_every``)."""
        return [m for m in range(min(self.selecting_stages, self.stages if stages is None else stages))
                if self.held_from(m) is None]

    @property
    def total_steps(self) -> int:
        return self.stages * self.steps_per_stage
