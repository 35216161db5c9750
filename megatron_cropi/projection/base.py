"""The projection interface: a batch of gradient shards of one parameter → ``[B, k]`` float32.

A projector is a fixed linear map ``P: R^d → R^k`` over the *global* (unsharded) gradient of the
whole model, ``d = Σ_p numel(p)``. It is defined globally and computed locally: whether coordinate
``j`` of parameter ``p`` is kept, and the column of ``P`` for it, depend only on
``(seed, global parameter name, global element index j)``. Hence, for any split of ``p`` into blocks
``b`` (TP shards, SwiGLU halves, chunks), ``P g = Σ_b project(g[b], spec_b)``, and partial k-vectors
are summed over TP then PP ranks (:mod:`megatron_cropi.projection.reduce`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["ShardSpec", "Projector"]


@dataclass(frozen=True)
class ShardSpec:
    """A block of a global parameter: ``global[offset[d] : offset[d] + shape[d]]`` for every dim d.

    Attributes:
        global_name: the parameter's name in the unsharded TP=1/PP=1 model.
        global_shape: its full shape.
        offset: the block's start index in every dimension.
        shape: the block's extent in every dimension.
    """

    global_name: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self):
        if not (len(self.global_shape) == len(self.offset) == len(self.shape)):
            raise ValueError(
                f"{self.global_name}: global_shape {tuple(self.global_shape)}, offset {tuple(self.offset)} and "
                f"shape {tuple(self.shape)} must have the same number of dimensions"
            )
        for d, (g, o, s) in enumerate(zip(self.global_shape, self.offset, self.shape)):
            if o < 0 or s < 0 or o + s > g:
                raise ValueError(
                    f"{self.global_name}: block [{o}:{o + s}) of dim {d} lies outside the global shape "
                    f"{tuple(self.global_shape)}"
                )

    @classmethod
    def whole(cls, name: str, shape) -> "ShardSpec":
        """The spec of an unsharded parameter."""
        shape = tuple(int(s) for s in shape)
        return cls(name, shape, (0,) * len(shape), shape)

    def global_slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@runtime_checkable
class Projector(Protocol):
    """Projects gradient shards into a k-dimensional sketch; linear in the gradient."""

    k: int
    """Output dimension."""

    def project(self, shard: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
        """Project ``shard`` of shape ``[B, *spec.shape]`` (any float dtype) to ``[B, k]`` float32.

        The result is this block's contribution; blocks of one model add up to the model's sketch.
        """
        ...
