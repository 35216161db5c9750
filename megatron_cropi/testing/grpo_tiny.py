"""A tiny GRPO setup for tests and benchmarks: a layout-independent tiny policy, the native sampler,
the synthetic suite's prompts and an easy verifiable reward.

The *easy task*: a response earns 1 when its first token is a digit (ids 2..11 of the synthetic
character vocabulary; 10 of 32 ids, so a random policy scores ~0.3 and groups of 8 have variance).
It needs no warm-up, so GRPO alone must raise the reward: the learning test's signal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from megatron_cropi.config.loader import from_dict
from megatron_cropi.grpo.config import GrpoConfig
from megatron_cropi.grpo.rollouts import per_response_rewarder
from megatron_cropi.grpo.trainer import GrpoTrainer
from megatron_cropi.metrics import MetricsLogger
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.records import PromptRecord, Response, SamplingParams

__all__ = ["DIGIT_IDS", "first_token_is_digit", "easy_prompts", "build_tiny_trainer"]

DIGIT_IDS = frozenset(range(2, 12))


def first_token_is_digit(prompt: PromptRecord, response: Response) -> float:
    """The easy task's reward: 1.0 iff the response's first token is a digit."""
    return float(len(response.token_ids) > 0 and int(response.token_ids[0]) in DIGIT_IDS)


def easy_prompts(per_family: int = 8, *, seed: int = 0) -> list[PromptRecord]:
    """Synthetic-suite pool prompts (13 families × ``per_family``, 14 tokens each)."""
    from megatron_cropi.data.synthetic import build_synthetic_sets

    return build_synthetic_sets(seed=seed, per_family=per_family, val_size=0, test_size=0, check_per_family=0).pool


def build_tiny_trainer(
    groups: ParallelGroups,
    grpo: dict[str, Any],
    *,
    model: dict[str, Any] | None = None,
    init_seed: int = 1,
    sampling: SamplingParams | None = None,
    prompts: Sequence[PromptRecord] | None = None,
    reward=first_token_is_digit,
    metrics_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    seed: int = 3,
    kv_cache: bool = True,
) -> GrpoTrainer:
    """A :class:`GrpoTrainer` on a ``tiny`` policy (vocab 32) with the native sampler.

    Args:
        groups: process groups (PP must be 1 for the native sampler; with PP > 1 the trainer has no
            engine and only :meth:`GrpoTrainer.train_on_rollouts` works).
        grpo: the ``grpo:`` section as a mapping.
        model: ``ModelConfig`` overrides (default: preset ``tiny`` with ``vocab_size: 32``).
        init_seed: parameters are drawn from ``(init_seed, global name)`` (same model in every layout).
        sampling: default ``n=8, T=1, max_tokens=2``.
        metrics_dir: TensorBoard directory (the metrics rank writes there).
        kv_cache: the native sampler's KV-cached decode (``False``: the full-sequence oracle).
    """
    from megatron_cropi.rollout.native_sampler import NativeSampler
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    mcfg = tiny_model_config(**({"vocab_size": 32} if model is None else model))
    policy = build_tiny_model(mcfg, groups, seed=init_seed)
    engine = NativeSampler(policy, groups, stop_token_ids=[1], kv_cache=kv_cache) if groups.pp_size == 1 else None
    cfg = from_dict(GrpoConfig, grpo)
    metrics = MetricsLogger(metrics_dir, enabled=groups.is_metrics_rank) if metrics_dir else None
    return GrpoTrainer(cfg, mcfg, groups, model=policy, engine=engine, rewarder=per_response_rewarder(reward),
                       sampling=sampling or SamplingParams(n=8, temperature=1.0, max_tokens=2, seed=5),
                       prompts=prompts, metrics=metrics, seed=seed, checkpoint_dir=checkpoint_dir)
