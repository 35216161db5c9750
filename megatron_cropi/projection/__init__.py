"""Sparse random projection of per-prompt gradients, computed shard by shard (DESIGN.md §4)."""

from megatron_cropi.projection.base import Projector, ShardSpec

__all__ = ["Projector", "ShardSpec"]
