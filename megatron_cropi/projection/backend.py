"""The shared skeleton of every projector backend: checks, batching over shards, the index cache.

A backend subclasses :class:`ShardProjector` and implements two methods:

* ``_build(spec, device)``: the index data of one block (kept local indices and whatever else the
  operator derives from the global indices: column keys, SJLT slots and signs). It does not depend on
  the gradient, so it is computed once per ``(ShardSpec, device)`` and cached.
* ``_accumulate(out, x, spec)``: add the block's contribution ``P_block · x`` to ``out [B, k]``
  (float32) for ``x = [B, numel]``.

The cache holds one entry per parameter block a rank projects; :meth:`ShardProjector.cache_nbytes`
reports its size (see each backend's docstring for the bytes per kept coordinate).
"""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_cropi.projection.base import ShardSpec
from megatron_cropi.projection.hashing import OPERATOR_VERSION
from megatron_cropi.projection.shards import (
    ProjectionInputError,
    check_batch,
    check_k,
    check_keep_ratio,
    check_spec,
    flatten_shard,
    kept_local_indices,
    spec_cache_key,
)

__all__ = ["ShardProjector", "compact_index"]


def compact_index(local: torch.Tensor, numel: int) -> torch.Tensor:
    """Local indices as int32 when the block has fewer than 2^31 elements (half the memory)."""
    return local.to(torch.int32) if numel < (1 << 31) else local


class ShardProjector:
    """Base class of the hash-defined projectors (see :mod:`megatron_cropi.projection.base`).

    Args:
        k: output dimension.
        keep_ratio: probability that a coordinate is kept, in (0, 1].
        seed: the operator's seed; with the global name and index it determines everything.
        cache_index: keep each block's index data between calls (default). False recomputes it per
            call: no memory, one extra hash pass over the block per call.
    """

    kind = "abstract"

    def __init__(self, *, k: int, keep_ratio: float = 1.0, seed: int = 0, cache_index: bool = True):
        self.k = check_k(k)
        self.keep_ratio = check_keep_ratio(keep_ratio)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ProjectionInputError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self.cache_index = bool(cache_index)
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    # ---- public API -------------------------------------------------------------------------
    def project(self, shard: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
        """Project ``shard [B, *spec.shape]`` (any float dtype) to this block's ``[B, k]`` float32
        contribution; contributions of the blocks of a model add up to its sketch."""
        x = flatten_shard(shard, spec)
        out = torch.zeros(x.shape[0], self.k, dtype=torch.float32, device=x.device)
        self._accumulate(out, x, spec)
        return out

    def project_many(self, items: Iterable[tuple[torch.Tensor, ShardSpec]]) -> torch.Tensor:
        """``Σ_i project(shard_i, spec_i)`` in one ``[B, k]`` buffer.

        Raises:
            ProjectionInputError: no items, or shards that differ in batch size, dtype or device.
        """
        items = list(items)
        batch, _, device = check_batch(items)
        out = torch.zeros(batch, self.k, dtype=torch.float32, device=device)
        for shard, spec in items:
            self._accumulate(out, flatten_shard(shard, spec), spec)
        return out

    def index_data(self, spec: ShardSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """The block's index data on ``device`` (cached unless ``cache_index`` is False)."""
        check_spec(spec)
        device = torch.device(device)
        key = spec_cache_key(spec, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        data = self._build(spec, device)
        if self.cache_index:
            self._cache[key] = data
        return data

    def cache_nbytes(self) -> int:
        """Bytes held by the index cache (all blocks, all devices)."""
        return sum(t.numel() * t.element_size() for data in self._cache.values() for t in data if t is not None)

    def clear_cache(self) -> None:
        self._cache.clear()

    def describe(self) -> dict:
        """What defines the operator (for artefact headers; equal dicts mean equal operators)."""
        return {"kind": self.kind, "k": self.k, "keep_ratio": self.keep_ratio, "seed": self.seed,
                "operator_version": OPERATOR_VERSION}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k not in ("kind", "operator_version"))
        return f"{type(self).__name__}({args})"

    # ---- backend hooks ----------------------------------------------------------------------
    def _kept(self, spec: ShardSpec, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(compact local indices or None when every coordinate is kept, global indices int64)``."""
        local, glob = kept_local_indices(spec, self.seed, self.keep_ratio, device)
        if local.numel() == spec.numel:  # nothing dropped: the gather is the identity
            return None, glob
        return compact_index(local, spec.numel), glob

    @staticmethod
    def _gather(x: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        """Kept columns of ``x [B, n]`` as float32 ``[B, m]`` (gather first, then upcast: bf16/fp16
        inputs are read at their own width and accumulated in float32)."""
        xk = x if local is None else x.index_select(1, local)
        return xk if xk.dtype == torch.float32 else xk.float()

    def _build(self, spec: ShardSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _accumulate(self, out: torch.Tensor, x: torch.Tensor, spec: ShardSpec) -> None:
        raise NotImplementedError
