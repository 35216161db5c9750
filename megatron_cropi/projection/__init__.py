"""Sparse random projection of per-prompt gradients, computed shard by shard (docs/design.md §4.2).

    from megatron_cropi.projection import ProjectionConfig, ShardSpec, build_projector, reduce_sketch

    proj = build_projector(ProjectionConfig(kind="sjlt", k=32768, keep_ratio=0.1))
    partial = proj.project_many([(grad_shard, spec), ...])     # [B, k] float32, this rank's blocks
    sketch = reduce_sketch(partial, groups)                     # summed over TP, then PP

Backends: ``dense`` (oracle), ``gaussian`` / ``rademacher`` (the paper's operator), ``sjlt``.
"""

from megatron_cropi.projection.backend import ShardProjector
from megatron_cropi.projection.base import Projector, ShardSpec
from megatron_cropi.projection.config import ProjectionConfig, build_projector, projector_kinds, register_projector
from megatron_cropi.projection.dense import DenseProjector
from megatron_cropi.projection.gaussian import GaussianProjector, RademacherProjector
from megatron_cropi.projection.reduce import project_local_gradients, projection_pieces, reduce_sketch
from megatron_cropi.projection.shards import ProjectionInputError
from megatron_cropi.projection.sjlt import SJLTProjector

__all__ = [
    "Projector",
    "ShardSpec",
    "ShardProjector",
    "ProjectionConfig",
    "ProjectionInputError",
    "build_projector",
    "projector_kinds",
    "register_projector",
    "DenseProjector",
    "GaussianProjector",
    "RademacherProjector",
    "SJLTProjector",
    "reduce_sketch",
    "projection_pieces",
    "project_local_gradients",
]
