"""The paper's operator: keep a random subset of coordinates, then a dense Gaussian (or Rademacher)
projection whose matrix is generated block by block on the fly.

For a block x (``[B, n]``) of parameter p with kept local indices ``L`` (global indices ``J``)::

    out[b, r] += (1/√k) Σ_{i} x[b, L_i] · G[r, J_i]

``G[r, j] = table[16 bits of lowbias32(colkey_p(j) XOR rowkey(⌊r/2⌋))]`` (low half for even r, high
half for odd r; :mod:`.hashing`): a 65536-level N(0, 1) for ``gaussian``, its sign (±1) for
``rademacher``. Column j depends on (seed, p, j) only, so any split of p gives the same columns, and
the rows of a k = 4096 projector are the first 4096 rows of a k = 32768 one. With the 1/√k scale,
``E‖P x‖² = ‖x_kept‖²`` (the norm of the kept sub-vector; ``E‖x_kept‖² = q‖x‖²`` over the mask).

Cost per call: a chunked gather of the kept columns, then ``m·k`` matrix entries generated (9 int32
passes per two entries, a table lookup each: ≈ 1.8 ns per entry on one CPU core, against ≈ 4 ns for
``normal_`` + matmul) and a ``[B, m] × [m, k]`` matmul, in blocks of ``block_size`` kept coordinates:
memory ``O(block_size × k + B × chunk)``, never ``O(m × k)``.

Index cache per block: kept local indices (int32, 4 B) + column keys (int32, 4 B) = 8 bytes per kept
coordinate; at keep_ratio 1 the indices are dropped (4 B). A 7B model at q = 0.1: 7e8 kept
coordinates × 8 B = 5.6 GB in total, divided over the TP × PP ranks (0.7 GB per rank at TP×PP = 8).
"""

from __future__ import annotations

import math

import torch

from megatron_cropi.projection.backend import ShardProjector
from megatron_cropi.projection.base import ShardSpec
from megatron_cropi.projection.hashing import column_keys, gaussian_table, gaussian_words, row_keys, words_to_entries
from megatron_cropi.projection.shards import ProjectionInputError

__all__ = ["GaussianProjector", "RademacherProjector", "auto_block_size"]

GATHER_CHUNK = 1 << 16
"""Kept coordinates gathered per step (bounds the ``[B, chunk]`` float32 copy of the input)."""

BLOCK_ENTRIES = 1 << 18
"""Matrix entries per generated block by default (1 MiB of float32: stays in L2 with its buffers)."""


def auto_block_size(k: int) -> int:
    """Kept coordinates per generated block: ``max(8, 2^18 // k)``."""
    return max(8, BLOCK_ENTRIES // k)


class GaussianProjector(ShardProjector):
    """Kept coordinates, then a dense N(0, 1)/√k projection generated on the fly.

    Args:
        k, keep_ratio, seed, cache_index: see :class:`ShardProjector`.
        block_size: kept coordinates per generated ``[block_size, k]`` matrix block (0 = auto).
    """

    kind = "gaussian"
    distribution = "gaussian"

    def __init__(self, *, k: int, keep_ratio: float = 1.0, seed: int = 0, block_size: int = 0,
                 cache_index: bool = True):
        super().__init__(k=k, keep_ratio=keep_ratio, seed=seed, cache_index=cache_index)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
            raise ProjectionInputError(f"block_size must be an int >= 0 (0 = auto), got {block_size!r}")
        self.block_size = block_size or auto_block_size(self.k)
        self._words = (self.k + 1) // 2
        self._rows: dict[str, torch.Tensor] = {}

    def row_keys(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._rows:
            self._rows[key] = row_keys(self.seed, self._words, device)
        return self._rows[key]

    def _build(self, spec: ShardSpec, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        local, glob = self._kept(spec, device)
        return local, column_keys(self.seed, spec.global_name, glob)

    def column_block(self, keys: torch.Tensor, device: torch.device, *, buffers=None) -> torch.Tensor:
        """``[m, k]`` float32 matrix columns (unscaled) of coordinates with column ``keys``."""
        m = keys.numel()
        wbuf, tbuf, ibuf, ebuf = buffers if buffers is not None else (None,) * 4
        words = gaussian_words(keys, self.row_keys(device), out=None if wbuf is None else wbuf[:m],
                               tmp=None if tbuf is None else tbuf[:m])
        ent = words_to_entries(words, gaussian_table(self.distribution, device),
                               out=None if ebuf is None else ebuf[: m * 2 * self._words],
                               index_buf=None if ibuf is None else ibuf[: m * 2 * self._words])
        return ent[:, : self.k]

    def _accumulate(self, out: torch.Tensor, x: torch.Tensor, spec: ShardSpec) -> None:
        local, keys = self.index_data(spec, x.device)
        m = keys.numel()
        if m == 0:
            return
        device, bs, w = x.device, min(self.block_size, m), self._words
        buffers = (
            torch.empty(bs, w, dtype=torch.int32, device=device),
            torch.empty(bs, w, dtype=torch.int32, device=device),
            torch.empty(bs * 2 * w, dtype=torch.int32, device=device),
            torch.empty(bs * 2 * w, dtype=torch.float32, device=device),
        )
        scale = 1.0 / math.sqrt(self.k)
        chunk = max(bs, (GATHER_CHUNK // bs) * bs)  # gather in chunks: memory O(B × chunk), not O(B × m)
        for c0 in range(0, m, chunk):
            c1 = min(m, c0 + chunk)
            xk = self._gather(x[:, c0:c1] if local is None else x, None if local is None else local[c0:c1])
            for s in range(c0, c1, bs):
                e = min(c1, s + bs)
                block = self.column_block(keys[s:e], device, buffers=buffers)
                out.addmm_(xk[:, s - c0 : e - c0], block, alpha=scale)


class RademacherProjector(GaussianProjector):
    """As :class:`GaussianProjector` with ±1/√k entries: the signs of the Gaussian matrix."""

    kind = "rademacher"
    distribution = "rademacher"
