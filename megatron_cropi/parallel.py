"""Distributed initialisation and the process groups of one run.

This is the only module of the package that touches ``megatron.core.parallel_state`` (a unit test
greps for it). Everything else receives a :class:`ParallelGroups` value and passes its groups on
explicitly: ``pg_collection=`` to Megatron models and schedules, ``group=`` to collectives.

Layout (Megatron's default order ``tp-cp-ep-dp-pp``): ranks are grouped TP-fastest, then DP, then PP,
so ``world_size = TP × DP × PP``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_cropi.cpu_runtime import apply_cpu_runtime, default_device

__all__ = [
    "LaunchError",
    "ParallelGroups",
    "init_distributed",
    "build_parallel_groups",
    "destroy_parallel_groups",
    "leave_together",
    "check_layout",
    "WorkCounter",
    "work_counter",
    "broadcast_in_replica",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SINGLE_WORLD_VARS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # set by a one-process world


class LaunchError(RuntimeError):
    """The process was not started the way a distributed run must be, or the layout cannot fit."""


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups and coordinates of this rank; built once, passed everywhere.

    Attributes:
        rank, world_size, local_rank: global coordinates from torchrun.
        tp_size, pp_size, dp_size: parallel degrees (``world_size == tp_size * pp_size * dp_size``).
        tp_rank, pp_rank, dp_rank: this rank's coordinate in each group.
        tp, pp, dp: the groups (``torch.distributed.ProcessGroup``).
        pg_collection: Megatron's ``ProcessGroupCollection`` for models, schedules and optimizers.
        device: where this rank's tensors live (``cuda:local_rank`` or ``cpu``).
        backend: ``"nccl"`` or ``"gloo"``.
    """

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp: object
    pp: object
    dp: object
    pg_collection: object
    device: torch.device
    backend: str

    @property
    def is_first_stage(self) -> bool:
        """This rank holds the embedding (pre_process)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the output layer and computes the loss (post_process)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def is_metrics_rank(self) -> bool:
        """The one rank that writes logs and progress: first TP and DP rank of the last stage."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


def check_layout(world_size: int, tp: int, pp: int) -> int:
    """Return the data-parallel size of ``world_size`` ranks at TP×PP, or raise :class:`LaunchError`."""
    if tp < 1 or pp < 1:
        raise LaunchError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    if world_size % (tp * pp) != 0:
        raise LaunchError(
            f"world size {world_size} is not divisible by TP×PP = {tp}×{pp} = {tp * pp}; launch a "
            f"multiple of {tp * pp} processes (e.g. torchrun --nproc-per-node {tp * pp}) or change "
            "parallel.tensor_model_parallel_size / parallel.pipeline_model_parallel_size"
        )
    return world_size // (tp * pp)


def init_distributed(*, backend: str | None = None, timeout_s: float = 600.0, allow_single: bool = False) -> str:
    """Initialise ``torch.distributed`` from torchrun's environment; return the backend used.

    Args:
        backend: ``"nccl"``/``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: collective timeout.
        allow_single: with no torchrun environment at all, start a one-process world on a free
            local port instead of failing (used by single-process CLI runs at TP=PP=1).

    Raises:
        LaunchError: torchrun's variables are missing (the message says how to launch).
    """
    if dist.is_initialized():
        return dist.get_backend()
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    # exactly what a one-process world started earlier in this process leaves (below): start one again
    leftover = (set(missing) == {"MASTER_ADDR", "MASTER_PORT"}
                and all(os.environ.get(k) == v for k, v in _SINGLE_WORLD_VARS.items()))
    single = bool(missing) and allow_single and (len(missing) == len(_TORCHRUN_VARS) or leftover)
    if missing and not single:
        raise LaunchError(
            "torch.distributed environment not found (missing " + ", ".join(missing) + "). Launch with "
            "torchrun, e.g. `torchrun --nproc-per-node 2 -m megatron_cropi.cli run CONFIG`; one node of "
            "N processes needs --nproc-per-node N, several nodes also --nnodes, --node-rank and "
            "--rdzv-endpoint (see examples/)."
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if single:
        # A lone process needs no rendezvous: an in-memory store, no TCP port to race for.
        os.environ.update(_SINGLE_WORLD_VARS)
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend, timeout=timeout)
    apply_cpu_runtime()
    return backend


def build_parallel_groups(tp: int, pp: int, *, seed: int = 1234) -> ParallelGroups:
    """Create Megatron's TP/PP/DP groups for this world and seed its RNG tracker.

    Args:
        tp: tensor-model-parallel size.
        pp: pipeline-model-parallel size.
        seed: base seed for ``model_parallel_cuda_manual_seed`` (TP ranks get distinct streams,
            the default stream is shared across TP ranks).

    Raises:
        LaunchError: ``torch.distributed`` is not initialised, or the world does not fit TP×PP.
    """
    if not dist.is_initialized():
        raise LaunchError("torch.distributed is not initialised; call init_distributed() first")
    apply_cpu_runtime()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.get_world_size()
    dp = check_layout(world, tp, pp)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    return ParallelGroups(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp_size=tp,
        pp_size=pp,
        dp_size=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp=parallel_state.get_tensor_model_parallel_group(),
        pp=parallel_state.get_pipeline_model_parallel_group(),
        dp=parallel_state.get_data_parallel_group(),
        pg_collection=pgc,
        device=default_device(),
        backend=dist.get_backend(),
    )


def destroy_parallel_groups(*, process_group: bool = False) -> None:
    """Tear down Megatron's groups (and the default process group if ``process_group``)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()


def leave_together() -> None:
    """End a command's distributed life: every rank meets at a barrier, then the groups are torn down.

    Why: a rank whose interpreter exits while a peer still holds its gloo connections (or while its own
    non-batched p2p requests, as under the interleaved schedule, are being reaped) can abort in teardown
    with "terminate called without an active exception"; seen in fresh-clone CI runs of ``cropi export``
    and ``cropi select`` under VPP. A no-op when no process group was initialised.
    """
    if dist.is_initialized():
        dist.barrier()
    destroy_parallel_groups(process_group=True)


class WorkCounter:
    """A job-wide counter: :meth:`take` returns 0, 1, 2, … across all ranks, each number once (an atomic
    ``add`` on a ``torch.distributed`` key-value store)."""

    def __init__(self, store, key: str):
        self.store, self.key = store, key
        self._local = 0

    def take(self) -> int:
        if self.store is None:  # a lone process without a store
            self._local += 1
            return self._local - 1
        return int(self.store.add(self.key, 1)) - 1


def work_counter(key: str) -> WorkCounter:
    """A :class:`WorkCounter` named ``key`` on the job's rendezvous store (the TCPStore torchrun's ranks
    share; no new port). ``key`` must be new for each queue: the store lives as long as the job.

    The store is reached through ``distributed_c10d._get_default_store`` (torch has no public accessor);
    this is the one place that does so."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return WorkCounter(None, key)
    return WorkCounter(dist.distributed_c10d._get_default_store(), f"megatron_cropi/{key}")


def broadcast_in_replica(value: int, groups: ParallelGroups) -> int:
    """``value`` of this replica's first rank (TP rank 0 of PP stage 0) on every rank of the replica: over
    the PP group from stage 0, then over the TP group from TP rank 0."""
    if groups.tp_size == 1 and groups.pp_size == 1:
        return int(value)
    box = torch.tensor([int(value)], dtype=torch.int64, device=groups.device)
    if groups.pp_size > 1 and groups.tp_rank == 0:
        dist.broadcast(box, src=dist.get_global_rank(groups.pp, 0), group=groups.pp)
    if groups.tp_size > 1:
        dist.broadcast(box, src=dist.get_global_rank(groups.tp, 0), group=groups.tp)
    return int(box.item())
