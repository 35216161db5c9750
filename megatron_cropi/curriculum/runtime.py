"""Wiring: from a :class:`~megatron_cropi.config.schema.RunConfig` to the live objects of a run.

:class:`PolicyRuntime` holds this rank's process groups, the tokenizer, the policy model inside its
:class:`~megatron_cropi.grpo.trainer.GrpoTrainer` (DDP, optimizer carried across stages), the rollout
engine that samples from it (the native sampler shares its weights; vLLM gets them pushed after each
update), the reward function, and the run's prompt sets. The stage controller only calls into it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_cropi.parallel import ParallelGroups, build_parallel_groups, init_distributed
from megatron_cropi.rollout.types import PromptRecord

class RunInputError(ValueError):
    """The run's inputs cannot make a run (an empty pool, no target set, a tokenizer that does not fit)."""


__all__ = ["RunInputError", "PromptSets", "PolicyRuntime", "load_prompt_sets", "configure_threads", "setup_run", "build_policy_model"]

log = logging.getLogger(__name__)


def configure_threads(num_threads: int) -> int:
    """torch threads for this process: the configured number, or cores ÷ local processes."""
    import os

    if num_threads <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        num_threads = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(num_threads)
    return num_threads


@dataclass
class PromptSets:
    """The run's prompts: the pool, one or more target sets, the test set and the check set."""

    pool: list[PromptRecord]
    targets: dict[str, list[PromptRecord]]
    test: list[PromptRecord]
    check: list[PromptRecord]
    summaries: dict

    @property
    def target_family(self) -> str:
        return sorted(self.targets)[0]


def load_prompt_sets(cfg) -> tuple[PromptSets, object]:
    """Load every split of ``cfg.data`` (and the tokenizer). Target sets are the val split, one per
    source (the synthetic suite has one: its target family).

    Raises:
        ValueError: an empty pool or no target prompt.
    """
    from megatron_cropi.data.prompts import build_tokenizer, load_prompt_set

    tok = build_tokenizer(cfg.data)
    sets = {s: load_prompt_set(cfg.data, s, tokenizer=tok) for s in ("pool", "val", "test", "check")}
    if not sets["pool"].records:
        raise RunInputError("the pool is empty: data.pool (or data.synthetic.per_family) gives no prompt")
    targets: dict[str, list[PromptRecord]] = {}
    for rec in sets["val"].records:
        targets.setdefault(rec.source or "val", []).append(rec)
    if not targets:
        raise RunInputError("no target set: data.val (or data.synthetic.val_size) gives no prompt; CROPI scores "
                         "the pool against the gradient of a target set")
    return PromptSets(pool=sets["pool"].records, targets=targets, test=sets["test"].records,
                      check=sets["check"].records, summaries={s: v.summary() for s, v in sets.items()}), tok


def setup_run(cfg) -> tuple[ParallelGroups, PromptSets, object]:
    """Initialise torch.distributed (a lone process needs no torchrun), threads, groups; load the data."""
    init_distributed(allow_single=True)
    configure_threads(cfg.run.num_threads)
    groups = build_parallel_groups(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                                   seed=cfg.run.seed)
    prompts, tokenizer = load_prompt_sets(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise RunInputError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {cfg.model.vocab_size}")
    return groups, prompts, tokenizer


def build_policy_model(cfg, groups: ParallelGroups, *, hf_dir: str | Path | None = None):
    """This rank's policy stage: weights from an HF directory, else drawn from ``(run.seed, name)``."""
    from megatron_cropi.model.params import init_params_by_global_name
    from megatron_cropi.model.provider import build_gpt_model

    model = build_gpt_model(cfg.model, groups)
    if hf_dir:
        from megatron_cropi.checkpoint import load_hf_into_model

        load_hf_into_model(model, groups, hf_dir)
    else:
        init_params_by_global_name(model, groups, seed=cfg.run.seed,
                                   std=cfg.model.transformer.get("init_method_std", 0.02))
    return model


class PolicyRuntime:
    """This rank's policy, engine, rewarder and trainer for a run (see the module docstring).

    Args:
        cfg: the run configuration.
        groups, tokenizer: from :func:`setup_run`.
        hf_dir: initial weights (the warm-up's or ``rollout.checkpoint``); None: seeded random init.
        total_steps: GRPO steps the LR schedule spans.
        metrics: a :class:`~megatron_cropi.metrics.MetricsLogger`.
    """

    def __init__(self, cfg, groups: ParallelGroups, tokenizer, *, hf_dir=None, total_steps: int, metrics=None):
        from megatron_cropi.grpo.rollouts import make_rewarder
        from megatron_cropi.grpo.trainer import GrpoTrainer
        from megatron_cropi.rewards.base import RewardFunction
        from megatron_cropi.rewards.config import reward_config_for

        self.cfg, self.groups, self.tokenizer = cfg, groups, tokenizer
        self.hf_dir = str(hf_dir) if hf_dir else ""
        self.model = build_policy_model(cfg, groups, hf_dir=hf_dir)
        self.engine = self._build_engine()
        self.reward_fn = RewardFunction(reward_config_for(cfg.rollout.reward, cfg.data.kind))
        self.rewarder = make_rewarder(self.reward_fn, tokenizer)
        self.sampling = cfg.rollout.sampling_params(cfg.run.seed)
        self.trainer = GrpoTrainer(cfg.grpo, cfg.model, groups, model=self.model, engine=self.engine,
                                   rewarder=self.rewarder, sampling=self.sampling, metrics=metrics,
                                   seed=cfg.run.seed, total_steps=max(1, total_steps),
                                   checkpoint_dir=Path(cfg.run.output_dir) / "checkpoints", pad_id=self.pad_id)

    def _build_engine(self):
        rc = self.cfg.rollout
        eos = [self.tokenizer.eos_token_id]
        if rc.engine == "native":
            from megatron_cropi.rollout.native_sampler import NativeSampler

            return NativeSampler(self.model, self.groups, stop_token_ids=eos, max_batch_sequences=rc.max_batch_sequences)
        from megatron_cropi.rollout.vllm_engine import VLLMEngine

        v = rc.vllm
        if self.groups.tp_rank != 0 or self.groups.pp_rank != 0:
            return None  # one vLLM engine per DP replica, on its lead rank; weights are pushed to it
        return VLLMEngine(self.hf_dir or rc.checkpoint, logprobs=rc.logprobs, stop_token_ids=eos,
                          tensor_parallel_size=v.tensor_parallel_size, dtype=v.dtype,
                          max_model_len=v.max_model_len or None, gpu_memory_utilization=v.gpu_memory_utilization,
                          enforce_eager=v.enforce_eager, enable_prefix_caching=v.enable_prefix_caching,
                          seed=self.cfg.run.seed, tokenizer_dir=rc.tokenizer_dir or None, isolate=False)

    @property
    def pad_id(self) -> int:
        return int(getattr(self.tokenizer, "pad_token_id", 0) or 0)

    def close(self) -> None:
        self.reward_fn.close()
        if hasattr(self.engine, "close"):
            self.engine.close()
        self.trainer.close()
