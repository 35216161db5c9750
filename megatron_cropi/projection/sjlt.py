"""Sparse JL transform on the kept coordinates: each kept coordinate is added to s output slots with
random signs, scaled by 1/√s (Kane & Nelson's block construction; s = 1 is the CountSketch).

For a block x (``[B, n]``) of parameter p with kept local indices ``L`` (global ``J``)::

    out[b, slot_t(J_i)] += sign_t(J_i)/√s · x[b, L_i]        for t < s

with ``slot_t``, ``sign_t`` from :func:`~megatron_cropi.projection.hashing.sjlt_slots_signs` of
(seed, p, j): layout-invariant like every backend. ``E‖P x‖² = ‖x_kept‖²`` and
``Var‖P x‖² = (2/k)(‖x_kept‖⁴ − ‖x_kept‖₄⁴)`` for every s, as for a Gaussian matrix up to the ‖·‖₄
term; larger s gives lighter tails for spiky x (Kane & Nelson 2014).

Cost per call: one gather of the kept columns of x (≈ one read of the shard when q ≳ 1/16, since the
kept coordinates touch most cache lines) and s scatter-adds into the ``[B, k]`` output, in chunks of
``GATHER_CHUNK`` kept coordinates so that a chunk's indices stay in cache for all B rows (memory
``O(B × chunk)``).

Index cache per block: local indices int32 (4 B) + per non-zero a slot int32 (4 B) and a sign int8
(1 B): ``4 + 5s`` bytes per kept coordinate (9 B at s = 1). A 7B model at q = 0.1: 7e8 × 9 B = 6.3 GB
in total, divided over the TP × PP ranks (0.8 GB per rank at TP×PP = 8); ``cache_index=False``
trades it for one hash pass over the block per call.
"""

from __future__ import annotations

import math

import torch

from megatron_cropi.projection.backend import ShardProjector
from megatron_cropi.projection.base import ShardSpec
from megatron_cropi.projection.hashing import sjlt_slots_signs
from megatron_cropi.projection.shards import ProjectionInputError

__all__ = ["SJLTProjector", "GATHER_CHUNK"]

GATHER_CHUNK = 1 << 16
"""Kept coordinates gathered and scattered per step on CPU (measured best of 2^14..2^20 on this CPU);
CUDA takes all of a block's kept coordinates in one step."""


class SJLTProjector(ShardProjector):
    """Kept coordinates, then a sparse JL with ``s`` non-zeros ±1/√s per coordinate.

    Args:
        k, keep_ratio, seed, cache_index: see :class:`ShardProjector`.
        s: non-zeros per kept coordinate, ``1 <= s <= k``.
    """

    kind = "sjlt"

    def __init__(self, *, k: int, keep_ratio: float = 1.0, seed: int = 0, s: int = 1, cache_index: bool = True):
        super().__init__(k=k, keep_ratio=keep_ratio, seed=seed, cache_index=cache_index)
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= self.k:
            raise ProjectionInputError(
                f"sjlt s (non-zeros per coordinate) must be an int in [1, k={self.k}], got {s!r}")
        self.s = s

    def describe(self) -> dict:
        return {**super().describe(), "s": self.s}

    def _build(self, spec: ShardSpec, device: torch.device):
        local, glob = self._kept(spec, device)
        slots, signs = sjlt_slots_signs(self.seed, spec.global_name, glob, self.k, self.s)
        return local, slots.to(torch.int32), signs

    def _accumulate(self, out: torch.Tensor, x: torch.Tensor, spec: ShardSpec) -> None:
        local, slots, signs = self.index_data(spec, x.device)
        m = slots.shape[1]
        batch = x.shape[0]
        scale = 1.0 / math.sqrt(self.s)
        # CPU: chunks of kept coordinates, so that a chunk's indices, slots and gathered values stay in
        # cache while all B rows use them (unchunked, a large shard streams its index B times).
        # CUDA: one pass; each chunk costs ~5 kernel launches, which dominated at d = 4e6 (a GPU run
        # measured 7% of the plain read bandwidth with 2^16-coordinate chunks).
        chunk = max(m, 1) if x.is_cuda else GATHER_CHUNK
        for c0 in range(0, m, chunk):
            c1 = min(m, c0 + chunk)
            if local is None:  # every coordinate kept: a view of the input, copied only to upcast
                xk = x[:, c0:c1]
                owned = xk.dtype != torch.float32
                xk = xk.float()
            else:
                xk, owned = self._gather(x, local[c0:c1]), True
            for t in range(self.s):
                sign = signs[t, c0:c1].to(torch.float32)
                if scale != 1.0:
                    sign.mul_(scale)
                # the last pass may scale the values in place when they are our own copy
                vals = xk.mul_(sign) if (t == self.s - 1 and owned) else xk * sign
                out.scatter_add_(1, slots[t, c0:c1].to(torch.int64).expand(batch, -1), vals)
