"""On-policy rollouts for a GRPO step: generate, score, share within the model-parallel replica.

Every rank of a TP/PP replica must train on the same rollout groups. :class:`RolloutCollector`

* calls the engine on every TP rank when the engine is *collective* (the native Megatron sampler:
  a TP group samples together), otherwise only on the replica's lead rank (TP rank 0 of the first
  pipeline stage; e.g. the vLLM engine lives there);
* scores the responses on the lead rank with a *rewarder* (``(prompts, responses) → RolloutGroup``s);
* broadcasts the scored groups from the lead over its TP group, then over every PP group.

A rewarder comes from :func:`make_rewarder` (the rollout issue's ``RewardFunction`` + tokenizer, i.e.
the verifier registry) or :func:`per_response_rewarder` (any ``reward_fn(prompt, response) -> float``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch.distributed as dist

from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.records import PromptRecord, Response, RolloutGroup, SamplingParams

__all__ = ["Rewarder", "make_rewarder", "per_response_rewarder", "RolloutCollector", "is_collective_engine"]

Rewarder = Callable[[Sequence[PromptRecord], Sequence[Sequence[Response]], int], list[RolloutGroup]]
"""``rewarder(prompts, responses, policy_version) -> groups``: score every response of every prompt."""


def make_rewarder(reward_fn, tokenizer) -> Rewarder:
    """A rewarder from a :class:`~megatron_cropi.rewards.base.RewardFunction` and the prompts' tokenizer
    (decodes each response, one verifier call per batch)."""
    from megatron_cropi.rollout.runner import score_groups

    def rewarder(prompts, responses, policy_version=0):
        return score_groups(prompts, responses, reward_fn, tokenizer, policy_version=policy_version)

    return rewarder


def per_response_rewarder(fn: Callable[[PromptRecord, Response], float]) -> Rewarder:
    """A rewarder calling ``fn(prompt, response) -> float`` on each response."""
    def rewarder(prompts, responses, policy_version=0):
        return [RolloutGroup(prompt=p, responses=tuple(rs),
                             rewards=np.asarray([fn(p, r) for r in rs], dtype=np.float32), policy_version=policy_version)
                for p, rs in zip(prompts, responses)]

    return rewarder


def is_collective_engine(engine) -> bool:
    """Engines that every rank of a replica must call together: the native Megatron sampler (its TP group)
    and colocated vLLM engines (``world_collective``: the whole world, ``rollout/colocated.py``)."""
    from megatron_cropi.rollout.native_sampler import NativeSampler

    return isinstance(engine, NativeSampler) or bool(getattr(engine, "world_collective", False))


class RolloutCollector:
    """Generates and scores one replica's rollout groups; every rank of the replica gets them.

    Args:
        engine: a ``RolloutEngine`` (None on ranks that do not hold a non-collective engine).
        rewarder: see :data:`Rewarder` (used on the lead rank).
        groups: this rank's process groups.
        collective: whether every TP rank calls the engine (default: :func:`is_collective_engine`).
    """

    def __init__(self, engine, rewarder: Rewarder, groups: ParallelGroups, *, collective: bool | None = None):
        self.engine, self.rewarder, self.groups = engine, rewarder, groups
        self.collective = is_collective_engine(engine) if collective is None else collective
        if self.collective and groups.pp_size > 1 and not getattr(engine, "world_collective", False):
            raise ValueError("a collective (native) rollout engine needs pipeline_model_parallel_size=1; "
                             "use the vLLM engine with PP > 1")

    @property
    def is_lead(self) -> bool:
        return self.groups.tp_rank == 0 and self.groups.pp_rank == 0

    def collect(self, prompts: Sequence[PromptRecord], sampling: SamplingParams, *,
                policy_version: int = 0) -> list[RolloutGroup]:
        """``sampling.n`` scored responses per prompt of this replica, identical on all its ranks."""
        result = None
        if self.is_lead and self.engine is None:
            raise ValueError("the replica's lead rank (TP rank 0, first stage) has no rollout engine")
        if self.collective or self.is_lead:
            world = getattr(self.engine, "world_collective", False)  # colocated vLLM: every rank, every call
            responses = self.engine.generate(list(prompts), sampling) if (prompts or world) else []
            if self.is_lead:
                result = self.rewarder(list(prompts), responses, policy_version) if prompts else []
        return self._share(result)

    def _share(self, result):
        g = self.groups
        box = [result]
        if g.tp_size > 1 and g.pp_rank == 0:
            dist.broadcast_object_list(box, src=dist.get_global_rank(g.tp, 0), group=g.tp)
        if g.pp_size > 1:
            dist.broadcast_object_list(box, src=dist.get_global_rank(g.pp, 0), group=g.pp)
        return box[0]
