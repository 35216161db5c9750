"""Accuracy of the current policy on a prompt set: sampled pass rate and greedy accuracy, per source.

The headline metric is the *sampled* pass rate (mean reward of ``samples`` responses at T = 1): a
calibration of the CPU default found greedy accuracy flat and noisy under full-data GRPO while the
sampled rate moves smoothly (shared/reference/embedded-task.md §5). Prompts are split over DP
replicas; every rank returns the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch.distributed as dist

from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.rollout.types import PromptRecord, SamplingParams

__all__ = ["evaluate_accuracy"]


def evaluate_accuracy(collector, groups: ParallelGroups, prompts: Sequence[PromptRecord], sampling: SamplingParams, *,
                      samples: int, temperature: float, seed: int, max_prompts: int = 0) -> dict:
    """Pass rate of ``samples`` responses per prompt at ``temperature`` (0: greedy, one response).

    Args:
        collector: a :class:`~megatron_cropi.grpo.rollouts.RolloutCollector` (engine + rewarder).
        sampling: the run's sampling parameters (max tokens, log-prob mode).
        seed: sampling seed (an evaluation never touches the training RNG).
        max_prompts: evaluate the first this many prompts (0: all).

    Returns:
        ``{"pass_rate": float, "prompts": int, "by_source": {source: pass rate}}``.
    """
    prompts = list(prompts[:max_prompts] if max_prompts else prompts)
    greedy = temperature == 0
    sp = dataclasses.replace(sampling, n=1 if greedy else samples, temperature=temperature, seed=seed,
                             top_p=1.0, logprobs="raw" if greedy else sampling.logprobs)
    per = -(-len(prompts) // groups.dp_size)
    local = prompts[groups.dp_rank * per:(groups.dp_rank + 1) * per]
    sums: dict[str, list[float]] = {}
    if local:
        for grp in collector.collect(local, sp, policy_version=-1):
            acc = sums.setdefault(grp.prompt.source or "all", [0.0, 0.0])
            acc[0] += float((grp.rewards > 0.5).sum())
            acc[1] += float(len(grp.rewards))
    if groups.dp_size > 1:
        parts = [None] * groups.dp_size
        dist.all_gather_object(parts, sums, group=groups.dp)
        merged: dict[str, list[float]] = {}
        for part in parts:
            for src, (ok, n) in part.items():
                m = merged.setdefault(src, [0.0, 0.0])
                m[0] += ok
                m[1] += n
        sums = merged
    total_ok = sum(v[0] for v in sums.values())
    total_n = sum(v[1] for v in sums.values())
    return {"pass_rate": total_ok / max(total_n, 1.0), "prompts": len(prompts),
            "by_source": {s: v[0] / max(v[1], 1.0) for s, v in sorted(sums.items())}}
