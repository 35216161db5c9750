"""The test oracle: materialise the full ``[k, d_p]`` matrix of a parameter and multiply.

:class:`DenseProjector` builds, for the *whole* global parameter, the matrix of the same operator a
fast backend computes (``gaussian``, ``rademacher`` or ``sjlt``), straight from the definitions in
:mod:`.hashing`: every global index at once, no gather, no blocking, no cache of kept indices. A
shard is projected by picking the columns of its global indices. The fast backends must equal it to
float rounding for every layout; it refuses matrices above ``max_entries`` (small sizes only).
"""

from __future__ import annotations

import math

import torch

from megatron_cropi.projection.backend import ShardProjector
from megatron_cropi.projection.base import ShardSpec
from megatron_cropi.projection.hashing import (
    STREAM_KEEP,
    column_keys,
    gaussian_table,
    gaussian_words,
    keep_threshold,
    kept_mask,
    row_keys,
    sjlt_slots_signs,
    stream_key,
    words_to_entries,
)
from megatron_cropi.projection.shards import ProjectionInputError, global_index_tiles

__all__ = ["DenseProjector", "DENSE_OPERATORS"]

DENSE_OPERATORS = ("gaussian", "rademacher", "sjlt")


class DenseProjector(ShardProjector):
    """Reference projector over materialised matrices.

    Args:
        k, keep_ratio, seed: see :class:`ShardProjector`.
        operator: which backend's operator to materialise: gaussian, rademacher or sjlt.
        s: SJLT non-zeros per coordinate (operator ``sjlt`` only).
        max_entries: refuse parameters whose ``k × numel`` exceeds this (default 2^26: 256 MiB).
    """

    kind = "dense"

    def __init__(self, *, k: int, keep_ratio: float = 1.0, seed: int = 0, operator: str = "gaussian", s: int = 1,
                 max_entries: int = 1 << 26):
        super().__init__(k=k, keep_ratio=keep_ratio, seed=seed, cache_index=True)
        if operator not in DENSE_OPERATORS:
            raise ProjectionInputError(f"dense operator must be one of {DENSE_OPERATORS}, got {operator!r}")
        if operator == "sjlt" and not 1 <= s <= self.k:
            raise ProjectionInputError(f"sjlt s must be in [1, k={self.k}], got {s!r}")
        self.operator = operator
        self.s = s
        self.max_entries = int(max_entries)

    def describe(self) -> dict:
        out = {**super().describe(), "operator": self.operator}
        if self.operator == "sjlt":
            out["s"] = self.s
        return out

    def matrix(self, global_name: str, global_shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``[k, numel]`` float32 matrix of parameter ``global_name`` (column j = global index j).

        Raises:
            ProjectionInputError: ``k × numel`` exceeds ``max_entries``.
        """
        shape = tuple(int(v) for v in global_shape)
        d = math.prod(shape)
        if self.k * d > self.max_entries:
            raise ProjectionInputError(
                f"{global_name}: the dense oracle would materialise a {self.k} x {d} matrix "
                f"({self.k * d} entries > max_entries={self.max_entries}); it is for small test sizes, "
                "use the gaussian/rademacher/sjlt backends")
        device = torch.device(device)
        j = torch.arange(d, dtype=torch.int64, device=device)
        kept = kept_mask(stream_key(self.seed, STREAM_KEEP, global_name), j, keep_threshold(self.keep_ratio))
        mat = torch.zeros(self.k, d, dtype=torch.float32, device=device)
        if self.operator in ("gaussian", "rademacher"):
            rows = row_keys(self.seed, (self.k + 1) // 2, device)
            words = gaussian_words(column_keys(self.seed, global_name, j), rows)
            cols = words_to_entries(words, gaussian_table(self.operator, device))[:, : self.k]  # [d, k]
            mat.copy_(cols.t() / math.sqrt(self.k))
            mat[:, ~kept] = 0.0
        else:
            slots, signs = sjlt_slots_signs(self.seed, global_name, j, self.k, self.s)
            for t in range(self.s):
                vals = signs[t].to(torch.float32) / math.sqrt(self.s) * kept
                mat.index_put_((slots[t], j), vals, accumulate=True)
        return mat

    def _build(self, spec: ShardSpec, device: torch.device):
        mat = self.matrix(spec.global_name, spec.global_shape, device)
        glob = torch.cat([g.reshape(-1) for _, _, g in global_index_tiles(spec, device)]) if spec.numel else \
            torch.empty(0, dtype=torch.int64, device=device)
        return (mat[:, glob].contiguous(),)

    def _accumulate(self, out: torch.Tensor, x: torch.Tensor, spec: ShardSpec) -> None:
        (cols,) = self.index_data(spec, x.device)
        out.addmm_(x.float(), cols.t())
