"""Rank 0 acts, every rank learns the result or the error.

A run's files (stores, state, reports; not TensorBoard, which the metrics rank writes, nor under
``scoring.scale_out`` the feature-store shards and selection parts, written where they are made) are
written by global rank 0 alone (one writer, atomic writes); the other ranks must
still learn what it found (a value) or that it failed (the exception, re-raised on every rank), or
they would go on into the next collective and wait forever for a rank that has died.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

__all__ = ["on_rank0", "share_from_rank0"]

T = TypeVar("T")


def share_from_rank0(value):
    """``value`` as global rank 0 has it, on every rank (pickled broadcast). A lone process returns it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], T]) -> T:
    """Call ``fn()`` on global rank 0 only; every rank returns its result, or raises the error it raised.

    The result must pickle. An exception is re-raised as the same object on every rank (so the command
    line prints the same message from whichever rank reports it).
    """
    outcome = None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as err:  # noqa: BLE001 - every rank must stop, not only rank 0
            outcome = (False, err)
    ok, value = share_from_rank0(outcome)
    if not ok:
        raise value
    return value
