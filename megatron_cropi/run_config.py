"""The run's configuration tree: one frozen dataclass per step, composed into :class:`RunConfig`.

A YAML file maps onto it section by section::

    run:       {output_dir: runs/tiny, seed: 1234}
    parallel:  {tensor_model_parallel_size: 1, pipeline_model_parallel_size: 1}
    model:     {preset: tiny, transformer: {num_layers: 2}}

Each section's dataclass lives beside the code that uses it; this module only composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from megatron_cropi.config.compose import compose_config
from megatron_cropi.config.loader import (ConfigError, from_dict, non_default_keys, prune_unknown_keys,
                                         require, to_dict)
from megatron_cropi.curriculum.config import CurriculumConfig
from megatron_cropi.curriculum.state import register_config_upgrade
from megatron_cropi.data.config import DataConfig
from megatron_cropi.grpo.config import GrpoConfig
from megatron_cropi.influence.scorer import ScoringConfig
from megatron_cropi.model.config import ModelConfig
from megatron_cropi.projection.config import ProjectionConfig
from megatron_cropi.rollout.config import RolloutConfig
from megatron_cropi.selection.policies import SelectionConfig

__all__ = ["RunSection", "ParallelConfig", "RunConfig", "load_run_config", "config_to_yaml",
           "upgrade_stored_config", "INTERLEAVED_COMMANDS"]

INTERLEAVED_COMMANDS = ("score", "select")
"""The commands that run the interleaved (virtual pipeline) schedule: scoring only."""


@dataclass(frozen=True, kw_only=True)
class RunSection:
    """Where a run writes and how it is seeded."""

    output_dir: str = "runs/default"
    """Every artefact of the run (stores, checkpoints, TensorBoard, reports) goes under here."""
    seed: int = 1234
    """Base seed; every random choice derives from it and stable ids, never from rank or time."""
    num_threads: int = 0
    """torch intra-op threads per process; 0 = cores ÷ local processes (1 when oversubscribed)."""

    def __post_init__(self):
        require(bool(self.output_dir), "output_dir", self.output_dir, "must be a non-empty path")
        require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        require(self.num_threads >= 0, "num_threads", self.num_threads, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Model parallelism; data parallelism is whatever the world size leaves (world ÷ TP×PP)."""

    tensor_model_parallel_size: int = 1
    """TP: each linear layer split over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: layers split into this many stages."""
    num_microbatches: int = 1
    """Micro-batches per training step through Megatron's pipeline schedule."""

    def __post_init__(self):
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_microbatches"):
            value = getattr(self, key)
            require(1 <= value <= 4096, key, value, "must be between 1 and 4096")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole configuration of a ``cropi`` command."""

    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def __post_init__(self):
        self._refuse_ignored_keys()
        errors = self.model.layout_errors(self.parallel.tensor_model_parallel_size,
                                          self.parallel.pipeline_model_parallel_size)
        if errors:
            raise ConfigError("parallel", "the model cannot be split this way: " + "; ".join(errors))
        if self.model.transformer.get("sequence_parallel"):
            self._refuse_native_sampling_under_sp()
        layers = self.model.transformer["num_layers"]
        require(self.scoring.last_layers <= layers, "scoring.last_layers", self.scoring.last_layers,
                f"must be at most the model's {layers} decoder layers")
        policy = self.selection.policy
        if self.curriculum.refresh_behaviour_every and policy not in ("cropi", "learnability", "pass_rate_band"):
            raise ConfigError("curriculum.refresh_behaviour_every", f"{self.curriculum.refresh_behaviour_every}: "
                              f"selection.policy {policy} uses no behaviour rollouts (set it to 0)")
        if self.curriculum.background_scoring:
            self._check_background_scoring()
        if self.selection.guard.enabled and policy != "cropi":
            raise ConfigError("selection.guard.source", f"{self.selection.guard.source}: the guard applies to "
                              f"selection.policy cropi only, not {policy} (set it to none)")
        if self.curriculum.select_every > 1 and self.scoring.shortlist.enabled:
            raise ConfigError("curriculum.select_every", f"{self.curriculum.select_every} with scoring.shortlist: the "
                              "shortlist reads the ranking of the stage before, which a held stage does not make; "
                              "set curriculum.select_every to 1 or turn the shortlist off")

        if self.scoring.scale_out:
            if self.scoring.shortlist.enabled:
                raise ConfigError("scoring.scale_out", "true with scoring.shortlist: the shortlist carries a "
                                  "rank-0 ranking of every pool prompt, which scale-out scoring does not keep; turn one off")
            if self.selection.guard.source == "pool":
                raise ConfigError("scoring.scale_out", "true with selection.guard.source pool: the pool's mean "
                                  "gradient would gather the pool's vectors; use guard source check or none")

    def _check_background_scoring(self) -> None:
        why = None
        if self.selection.policy != "cropi":
            why = f"selection.policy {self.selection.policy} makes no scoring to move off the critical path"
        elif self.curriculum.trainer.kind != "native":
            why = f"curriculum.trainer.kind {self.curriculum.trainer.kind}: the stage is trained by a command, " \
                  "so there is no training to overlap"
        elif self.scoring.shortlist.enabled:
            why = "scoring.shortlist is on: the shortlist reads the ranking of the stage that is still training"
        elif (self.curriculum.background_scorer == "child"
              and self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size != 1):
            why = ("the background scorer is one process (curriculum.background_scorer child): TP and PP must be 1, "
                   "or set curriculum.background_scorer to external and launch the scoring job (`cropi serve-scoring`)")
        if why:
            raise ConfigError("curriculum.background_scoring", f"true: {why} (set it to false)")

    def refuse_interleaved_schedule(self, command: str) -> None:
        """Refuse the interleaved (virtual pipeline) schedule by name unless ``command`` supports it.

        ``cropi score`` and ``cropi select`` (and :class:`~megatron_cropi.api.CropiSelector`) run on the
        V model chunks per stage (:func:`~megatron_cropi.wiring.build_scoring_model`: checkpoints loaded
        into the chunks, POPI capture on them). Every other command also trains, samples or exports
        one module per stage: the GRPO step (its DDP wrapper, optimizer and schedule call), the log-prob
        and reference passes, the native sampler (PP = 1), checkpoint saving and HF export.

        Raises:
            ConfigError: ``model.transformer.virtual_pipeline_model_parallel_size`` is set and ``command``
                is not one of :data:`INTERLEAVED_COMMANDS`.
        """
        vp = self.model.virtual_pipeline_size
        if vp is None or command in INTERLEAVED_COMMANDS:
            return
        raise ConfigError("model.transformer.virtual_pipeline_model_parallel_size",
                          f"{vp}: the interleaved (virtual pipeline) schedule is supported by `cropi score` and "
                          f"`cropi select` only (scoring on model chunks), not by `cropi {command}`: its GRPO "
                          "training, log-prob passes, native sampler and checkpoint saving/export run one model "
                          "chunk per pipeline stage; use plain 1F1B pipeline parallelism (unset it)")

    def _refuse_native_sampling_under_sp(self) -> None:
        """The native sampler (rollouts, evaluation, the warm-up) runs the policy on sequences of every
        length, one position at a time with its KV cache or the whole prefix without: sequence
        parallelism splits positions TP ways and fails on a length TP does not divide. Capture and GRPO
        pad to a multiple of TP; sampling under SP is vLLM's."""
        if self.rollout.engine == "native":
            raise ConfigError("model.transformer.sequence_parallel", "true with rollout.engine native: the native "
                              "sampler cannot run a sequence-parallel policy (it decodes lengths TP does not divide); "
                              "use rollout.engine: vllm, or turn sequence_parallel off")
        if self.curriculum.warmup.enabled:
            raise ConfigError("model.transformer.sequence_parallel", "true with curriculum.warmup.enabled: the "
                              "warm-up samples with the native sampler and trains on batches of any length; turn "
                              "one of them off")

    def _refuse_ignored_keys(self) -> None:
        """A key the chosen mode never reads is an error naming it, not a setting silently dropped.

        Only modes a config is not meant to switch: the data kind (``DataConfig``), the rollout engine
        and the warm-up with files. Policy-specific keys stay allowed: one config is routinely run
        under several ``selection.policy`` values to compare them.
        """
        if self.rollout.engine != "vllm":
            changed = non_default_keys(self.rollout.vllm, prefix="rollout.vllm")
            if changed:
                key, value = changed[0]
                raise ConfigError(key, f"{value!r} is ignored because rollout.engine is {self.rollout.engine!r}; "
                                       "set rollout.engine: vllm, or remove rollout.vllm (override: rollout.vllm={})")
        if self.curriculum.warmup.enabled and self.data.kind != "synthetic":
            raise ConfigError("curriculum.warmup.enabled", f"True with data.kind {self.data.kind!r}: the warm-up "
                              "trains on the synthetic suite only (real models arrive instruction-tuned); set "
                              "curriculum.warmup.enabled: false")

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def to_dict(self) -> dict:
        return to_dict(self)


def load_run_config(path: str | Path, overrides: Iterable[str] = (),
                    environ: Mapping[str, str] | None = None, *, command: str = "run") -> RunConfig:
    """Load and validate a YAML run config, its ``extends`` chain and command-line ``overrides``
    (``key.path=value``, :mod:`megatron_cropi.config.compose`) for the ``cropi`` subcommand ``command``
    (:meth:`RunConfig.refuse_interleaved_schedule`: only ``score`` and ``select`` accept the interleaved
    schedule).

    Raises:
        ConfigError: naming the bad key, its value, what was expected, and where the value came from
            (``in FILE`` or ``from command-line override 'k=v'``).
    """
    tree = compose_config(path, overrides, environ)
    try:
        cfg = from_dict(RunConfig, tree.data)
        cfg.refuse_interleaved_schedule(command)
        return cfg
    except ConfigError as err:
        raise ConfigError(err.key, f"{err.message} ({tree.origin(err.key)})") from None


def upgrade_stored_config(stored: dict) -> dict:
    """A resolved config stored by a run (``state.json``) read through today's schema: keys added since
    take their defaults (in the stored config's context, e.g. its model preset), keys removed are
    dropped. Resume compares this with the new config (:mod:`megatron_cropi.curriculum.state`)."""
    return to_dict(from_dict(RunConfig, prune_unknown_keys(RunConfig, stored)))


register_config_upgrade(upgrade_stored_config)


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (every key, defaults included); loading it gives ``cfg`` back."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
