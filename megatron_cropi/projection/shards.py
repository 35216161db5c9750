"""From a :class:`ShardSpec` to global element indices and kept coordinates; input checks.

The global index of an element is its row-major flat index in the parameter's *global* shape. A
block along dim 0 (ColumnParallel TP shard) is a contiguous range of global indices; a block along
dim 1 (RowParallel) is a set of strided runs; a SwiGLU fc1 shard is two blocks. Every backend
derives everything random from these global indices (:mod:`.hashing`), which is what makes the
projection independent of the layout.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from megatron_cropi.projection.base import ShardSpec
from megatron_cropi.projection.hashing import STREAM_KEEP, keep_threshold, kept_mask, stream_key

__all__ = [
    "ProjectionInputError",
    "check_k",
    "check_keep_ratio",
    "check_spec",
    "flatten_shard",
    "check_batch",
    "global_index_tiles",
    "kept_local_indices",
    "spec_cache_key",
]

DEFAULT_TILE_ELEMS = 1 << 21
"""Elements hashed per step when building per-shard index data (bounds temporary memory)."""


class ProjectionInputError(ValueError):
    """A projector got input it cannot project; the message names the input and what was expected."""


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ProjectionInputError(f"projection dimension k must be an int > 0, got {k!r}")
    return k


def check_keep_ratio(keep_ratio) -> float:
    try:
        q = float(keep_ratio)
    except (TypeError, ValueError):
        raise ProjectionInputError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}") from None
    if not (0.0 < q <= 1.0):
        raise ProjectionInputError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if round(q * (1 << 32)) < 1:
        raise ProjectionInputError(f"keep_ratio {keep_ratio!r} keeps nothing; it must be >= 2^-32")
    return q


def check_spec(spec: ShardSpec) -> ShardSpec:
    """Re-check a spec (a frozen dataclass can still be built around ``__post_init__``)."""
    if not isinstance(spec, ShardSpec):
        raise ProjectionInputError(f"expected a ShardSpec, got {type(spec).__name__}")
    if not (len(spec.global_shape) == len(spec.offset) == len(spec.shape)):
        raise ProjectionInputError(
            f"{spec.global_name}: global_shape {tuple(spec.global_shape)}, offset {tuple(spec.offset)} and shape "
            f"{tuple(spec.shape)} must have the same number of dimensions")
    for d, (g, o, s) in enumerate(zip(spec.global_shape, spec.offset, spec.shape)):
        if o < 0 or s < 0 or o + s > g:
            raise ProjectionInputError(
                f"{spec.global_name}: slice [{o}:{o + s}) of dim {d} lies outside the global shape "
                f"{tuple(spec.global_shape)}")
    return spec


def spec_cache_key(spec: ShardSpec, device: torch.device) -> tuple:
    return (spec.global_name, tuple(spec.global_shape), tuple(spec.offset), tuple(spec.shape), str(device))


def flatten_shard(shard: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """Check ``shard`` against ``spec`` and return it as ``[B, numel]`` (a view when possible).

    Raises:
        ProjectionInputError: not a tensor, not floating point, or ``shard.shape[1:] != spec.shape``.
    """
    check_spec(spec)
    if not isinstance(shard, torch.Tensor):
        raise ProjectionInputError(f"{spec.global_name}: expected a torch.Tensor, got {type(shard).__name__}")
    if not shard.is_floating_point():
        raise ProjectionInputError(
            f"{spec.global_name}: gradient must be a floating-point tensor (float32/bfloat16/float16/float64), "
            f"got {shard.dtype}")
    if shard.dim() < 1 or tuple(shard.shape[1:]) != tuple(spec.shape):
        raise ProjectionInputError(
            f"{spec.global_name}: shard of shape {tuple(shard.shape)} does not match [B, *spec.shape] = "
            f"[B, {', '.join(str(s) for s in spec.shape)}] (block at offset {tuple(spec.offset)} of global "
            f"shape {tuple(spec.global_shape)})")
    return shard.reshape(shard.shape[0], spec.numel)


def check_batch(items: Sequence[tuple[torch.Tensor, ShardSpec]]) -> tuple[int, torch.dtype, torch.device]:
    """Batch size, dtype and device shared by every shard of one call.

    Raises:
        ProjectionInputError: empty call, or shards that differ in batch size, dtype or device.
    """
    if not items:
        raise ProjectionInputError("project_many needs at least one (shard, spec) pair")
    first, first_spec = items[0]
    if not isinstance(first, torch.Tensor) or first.dim() < 1:
        raise ProjectionInputError(f"{first_spec.global_name}: expected a tensor [B, *shape], got {first!r}")
    for shard, spec in items[1:]:
        if not isinstance(shard, torch.Tensor) or shard.dim() < 1:
            raise ProjectionInputError(f"{spec.global_name}: expected a tensor [B, *shape], got {shard!r}")
        if shard.dtype != first.dtype:
            raise ProjectionInputError(
                f"mismatched dtypes in one call: {first_spec.global_name} is {first.dtype}, "
                f"{spec.global_name} is {shard.dtype}; cast the gradients to one dtype")
        if shard.shape[0] != first.shape[0]:
            raise ProjectionInputError(
                f"mismatched batch sizes in one call: {first_spec.global_name} has B={first.shape[0]}, "
                f"{spec.global_name} has B={shard.shape[0]}")
        if shard.device != first.device:
            raise ProjectionInputError(
                f"mismatched devices in one call: {first_spec.global_name} on {first.device}, "
                f"{spec.global_name} on {shard.device}")
    return first.shape[0], first.dtype, first.device


def _strides(shape: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


def global_index_tiles(spec: ShardSpec, device: torch.device | str = "cpu",
                       tile_elems: int = DEFAULT_TILE_ELEMS) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(row_start, col_start, global_index)`` tiles covering the block in local row-major order.

    The block is viewed as ``[rows, last]`` (``last = spec.shape[-1]``, rows = the product of the
    other dims); ``global_index`` is an int64 ``[tile_rows, tile_cols]`` tile of it whose values are
    the elements' flat indices in ``spec.global_shape``. Tiles come in ascending local order and hold
    at most ``tile_elems`` elements (or one row piece). A 0-d parameter is one element, index 0.
    """
    shape = tuple(spec.shape) or (1,)
    gshape = tuple(spec.global_shape) or (1,)
    offset = tuple(spec.offset) or (0,)
    if spec.numel == 0:
        return
    gstr = _strides(gshape)
    last, rows = shape[-1], spec.numel // shape[-1]
    lead_shape = shape[:-1]
    col_step = min(last, tile_elems)
    rows_per_tile = max(1, tile_elems // last)  # 1 when a row is longer than a tile
    for r0 in range(0, rows, rows_per_tile):
        r1 = min(rows, r0 + rows_per_tile)
        # global offset of each local row: unravel the row index over the leading dims
        r = torch.arange(r0, r1, dtype=torch.int64, device=device)
        base = torch.full_like(r, offset[-1] * gstr[-1])
        for d in range(len(lead_shape) - 1, -1, -1):
            base += (r % lead_shape[d] + offset[d]) * gstr[d]
            r = r // lead_shape[d]
        for c0 in range(0, last, col_step):
            c1 = min(last, c0 + col_step)
            cols = torch.arange(c0, c1, dtype=torch.int64, device=device) * gstr[-1]
            yield r0, c0, base.view(-1, 1) + cols.view(1, -1)


def kept_local_indices(spec: ShardSpec, seed: int, keep_ratio: float, device: torch.device | str = "cpu",
                       tile_elems: int = DEFAULT_TILE_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept elements of a block: ``(local flat indices, global flat indices)``, both int64, ascending.

    Coordinate j of parameter p is kept iff ``high32(hash64(key(seed, KEEP, p), j)) < round(q·2^32)``,
    independently of how p is split.
    """
    key = stream_key(seed, STREAM_KEEP, spec.global_name)
    thr = keep_threshold(keep_ratio)
    last = (tuple(spec.shape) or (1,))[-1]
    local_parts, global_parts = [], []
    for r0, c0, gidx in global_index_tiles(spec, device, tile_elems):
        rr, cc = kept_mask(key, gidx, thr).nonzero(as_tuple=True)
        local_parts.append((rr + r0) * last + (cc + c0))
        global_parts.append(gidx[rr, cc])
    if not local_parts:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    return torch.cat(local_parts), torch.cat(global_parts)
