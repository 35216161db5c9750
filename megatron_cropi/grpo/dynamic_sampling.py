"""Dynamic sampling for a GRPO step (DAPO §3.2, GRESO): refill the batch with groups that have reward variance.

With ``B = grpo.prompts_per_step`` and ``R = grpo.dynamic_sampling.max_extra_rounds``::

    round r = 0, 1, ..., R:  draw B prompts (round 0: the step's batch; later rounds: the prompt stream);
                             DP rank d rolls out its contiguous slice with sampling seed s_r
                             (s_0 = the plain step's seed, s_r = hash(s_0, r) for r ≥ 1)
    kept                   = the first B groups in draw order (round, position) with Var(rewards) > 0
    stop                     once |kept| = B, or after R extra rounds

A group's samples are functions of ``(s_r, prompt id, sample index)`` only, never of the rank that
rolled it out, so ``kept`` is the same under every data-parallel size. The ranks agree on it by an
all-reduce of each round's variance flags (one number per prompt); every rank keeps the groups it
rolled out itself, each with its position in ``kept`` (the learner's mini-batch split ``position % U``
uses it). The learner's token-mean counts the response tokens of all ranks
(:class:`~megatron_cropi.grpo.loss.LossNormalizer`), so ranks may hold different numbers of kept
groups and the step's loss is exactly the one over ``kept``::

    L = Σ_{g ∈ kept} Σ_{n ∈ g} Σ_t m_{n,t} ℓ_{n,t}  /  Σ_{g ∈ kept} Σ_{n ∈ g} Σ_t m_{n,t}

Groups with variance drawn after ``kept`` is full are *surplus* (rolled out, not trained), as in DAPO.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.records import PromptRecord, RolloutGroup, SamplingParams

__all__ = ["DynamicBatch", "round_seed", "collect_dynamic_batch"]


def round_seed(step_seed: int, round_index: int) -> int:
    """Sampling seed of rollout round ``round_index`` of a step whose plain seed is ``step_seed``
    (round 0 samples exactly what a step without dynamic sampling would)."""
    if round_index == 0:
        return int(step_seed)
    digest = hashlib.blake2b(f"grpo-round:{step_seed}:{round_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class DynamicBatch:
    """A step's batch after dynamic sampling, as seen by one DP rank.

    Attributes:
        groups: this rank's kept groups (reward variance > 0), in draw order.
        positions: each kept group's position in the step's global kept list (0 .. kept − 1).
        sampled: every group this rank rolled out in any round (the step's reward statistics).
        kept: kept groups over all ranks (≤ ``prompts_per_step``).
        dropped: zero-variance groups rolled out over all ranks and rounds.
        surplus: groups with variance rolled out after the kept list was full.
        extra_rounds: rollout rounds after the first.
        rollout_seconds: time spent rolling out and scoring, all rounds together.
        prompt_ids: the kept prompts' ids in kept order (global; identical on every rank).
    """

    groups: list[RolloutGroup] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    sampled: list[RolloutGroup] = field(default_factory=list)
    kept: int = 0
    dropped: int = 0
    surplus: int = 0
    extra_rounds: int = 0
    rollout_seconds: float = 0.0
    prompt_ids: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """``kept_groups``, ``dropped_groups``, ``surplus_groups``, ``sampled_groups``, ``extra_rounds``."""
        return {"kept_groups": float(self.kept), "dropped_groups": float(self.dropped),
                "surplus_groups": float(self.surplus), "extra_rounds": float(self.extra_rounds),
                "sampled_groups": float(self.kept + self.dropped + self.surplus)}


def _variance_flags(local: Sequence[RolloutGroup], start: int, size: int, groups: ParallelGroups) -> list[bool]:
    """``[size]`` flags ``Var(rewards) > 0`` of the whole round, from each DP rank's slice ``[start, start + len)``."""
    flags = torch.zeros(size, dtype=torch.float64, device=groups.device)
    if local:
        flags[start:start + len(local)] = torch.tensor([0.0 if g.zero_variance else 1.0 for g in local],
                                                       dtype=torch.float64, device=groups.device)
    if groups.dp_size > 1:
        dist.all_reduce(flags, group=groups.dp)
    return [bool(v > 0.5) for v in flags.tolist()]


def collect_dynamic_batch(collector, groups: ParallelGroups, first_batch: Sequence[PromptRecord], *,
                          draw: Callable[[int], list[PromptRecord]] | None, max_extra_rounds: int,
                          sampling: SamplingParams, policy_version: int) -> DynamicBatch:
    """Roll out rounds of prompts until ``len(first_batch)`` groups with reward variance are kept.

    Args:
        collector: a :class:`~megatron_cropi.grpo.rollouts.RolloutCollector` (generates and scores a
            replica's prompts, identically on all its ranks).
        groups: this rank's process groups (the round is split over DP in contiguous slices).
        first_batch: round 0's global prompts; its size ``B`` is the step's target and every round's size.
        draw: ``draw(B)`` gives the next round's global prompts (the prompt stream); None: no extra rounds.
        max_extra_rounds: rounds allowed after the first.
        sampling: the step's sampling parameters; its seed is round 0's (:func:`round_seed`).
        policy_version: recorded in the rollout groups.

    Raises:
        ValueError: ``B`` is not divisible by the data-parallel size.
    """
    size = len(first_batch)
    if size % groups.dp_size:
        raise ValueError(f"a step's batch of {size} prompts is not divisible by the data-parallel size {groups.dp_size}")
    per = size // groups.dp_size
    start = groups.dp_rank * per
    out = DynamicBatch()
    prompts, round_index = list(first_batch), 0
    while True:
        local = prompts[start:start + per]
        round_sampling = dataclasses.replace(sampling, seed=round_seed(sampling.seed, round_index))
        t0 = time.perf_counter()
        rolled = collector.collect(local, round_sampling, policy_version=policy_version)
        out.rollout_seconds += time.perf_counter() - t0
        out.sampled.extend(rolled)
        for i, has_variance in enumerate(_variance_flags(rolled, start, size, groups)):
            if not has_variance:
                out.dropped += 1
            elif out.kept < size:
                if start <= i < start + per:
                    out.groups.append(rolled[i - start])
                    out.positions.append(out.kept)
                out.prompt_ids.append(prompts[i].prompt_id)
                out.kept += 1
            else:
                out.surplus += 1
        if out.kept >= size or draw is None or round_index >= max_extra_rounds:
            return out
        round_index += 1
        out.extra_rounds = round_index
        prompts = list(draw(size))
