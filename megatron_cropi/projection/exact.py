"""The exact (identity) "projection": each block's gradient written at its global coordinates.

``k`` is the number of scored parameters, so the sketch *is* the full per-prompt gradient, laid out in
sorted global-name order. Linear and layout invariant like every projector, so capture sums its
partial outputs over TP and PP as usual. Only for small models: probes of projection quality and
exactness tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_cropi.projection.base import ShardSpec

__all__ = ["ExactProjector"]


class ExactProjector:
    """Identity map into ``[B, d]``, ``d = Σ numel`` of the named global parameters.

    Args:
        shapes: ``{global_name: global_shape}`` of every parameter that may be projected.
    """

    kind = "exact"

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.offsets, at = {}, 0
        for name in sorted(shapes):
            self.offsets[name] = (at, tuple(shapes[name]))
            at += int(torch.Size(shapes[name]).numel())
        self.k = at

    @classmethod
    def for_layouts(cls, layouts, groups=None) -> "ExactProjector":
        """From :class:`~megatron_cropi.model.params.ParamLayout` values of this rank (and every other rank's)."""
        mine = {l.global_name: tuple(l.global_shape) for l in layouts}
        if groups is not None and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
            for part in parts:
                mine.update(part)
        return cls(mine)

    def project(self, shard: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
        """``[B, *spec.shape]`` → ``[B, d]`` with the block at its global coordinates."""
        if spec.global_name not in self.offsets:
            raise KeyError(f"parameter {spec.global_name!r} is not in this exact projector's layout")
        base, gshape = self.offsets[spec.global_name]
        if tuple(gshape) != tuple(spec.global_shape):
            raise ValueError(f"{spec.global_name}: global shape {tuple(spec.global_shape)}, expected {gshape}")
        if tuple(shard.shape[1:]) != tuple(spec.shape):
            raise ValueError(f"{spec.global_name}: shard of shape {tuple(shard.shape[1:])}, spec says {spec.shape}")
        idx = torch.arange(int(torch.Size(gshape).numel()), device=shard.device).view(gshape)[spec.global_slices()]
        out = torch.zeros(shard.shape[0], self.k, dtype=torch.float32, device=shard.device)
        out[:, base + idx.reshape(-1)] = shard.reshape(shard.shape[0], -1).float()
        return out
