"""``ProjectionConfig`` (the ``projection:`` section of a run) and the backend registry.

    projection: {kind: sjlt, k: 32768, keep_ratio: 0.1, seed: 0, sjlt_s: 1}

``build_projector(cfg)`` returns the backend named by ``cfg.kind``; :func:`register_projector` adds
one (e.g. a CUDA kernel) without touching this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_cropi.config.loader import require
from megatron_cropi.projection.backend import ShardProjector
from megatron_cropi.projection.dense import DENSE_OPERATORS, DenseProjector
from megatron_cropi.projection.gaussian import GaussianProjector, RademacherProjector
from megatron_cropi.projection.sjlt import SJLTProjector

__all__ = ["ProjectionConfig", "build_projector", "register_projector", "projector_kinds"]


@dataclass(frozen=True, kw_only=True)
class ProjectionConfig:
    """The sparse random projection of per-prompt gradients (docs/design.md §4.2)."""

    kind: str = "sjlt"
    """Backend: ``sjlt`` (fast sparse JL), ``gaussian`` / ``rademacher`` (the paper's dense projection
    of the kept coordinates, generated on the fly), ``dense`` (materialised test oracle, tiny models)."""
    k: int = 32768
    """Projected dimension (the paper: 32768)."""
    keep_ratio: float = 0.1
    """Fraction of gradient coordinates kept before projecting, in (0, 1] (the paper: ~0.1-0.15)."""
    seed: int = 0
    """Seed of the operator; with the global parameter name and element index it fixes every choice."""
    sjlt_s: int = 1
    """SJLT non-zeros per kept coordinate (1 = CountSketch)."""
    block_size: int = 0
    """Gaussian/Rademacher: kept coordinates per generated matrix block; 0 = auto (2^18 / k)."""
    cache_index: bool = True
    """Cache each shard's kept indices, slots and signs (see the backends for bytes per coordinate)."""
    dense_operator: str = "gaussian"
    """``dense`` only: which operator to materialise (gaussian, rademacher or sjlt)."""

    def __post_init__(self):
        require(self.kind in _REGISTRY, "kind", self.kind, f"one of {sorted(_REGISTRY)}")
        require(self.k >= 1, "k", self.k, "an int >= 1")
        require(0.0 < self.keep_ratio <= 1.0, "keep_ratio", self.keep_ratio, "a number in (0, 1]")
        require(round(self.keep_ratio * 2**32) >= 1, "keep_ratio", self.keep_ratio, "a ratio >= 2^-32")
        require(self.seed >= 0, "seed", self.seed, "an int >= 0")
        require(1 <= self.sjlt_s <= self.k, "sjlt_s", self.sjlt_s, f"an int in [1, k={self.k}]")
        require(self.block_size >= 0, "block_size", self.block_size, "an int >= 0 (0 = auto)")
        require(self.dense_operator in DENSE_OPERATORS, "dense_operator", self.dense_operator,
                f"one of {list(DENSE_OPERATORS)}")


_REGISTRY: dict[str, Callable[[ProjectionConfig], ShardProjector]] = {
    "sjlt": lambda c: SJLTProjector(k=c.k, keep_ratio=c.keep_ratio, seed=c.seed, s=c.sjlt_s,
                                    cache_index=c.cache_index),
    "gaussian": lambda c: GaussianProjector(k=c.k, keep_ratio=c.keep_ratio, seed=c.seed, block_size=c.block_size,
                                            cache_index=c.cache_index),
    "rademacher": lambda c: RademacherProjector(k=c.k, keep_ratio=c.keep_ratio, seed=c.seed,
                                                block_size=c.block_size, cache_index=c.cache_index),
    "dense": lambda c: DenseProjector(k=c.k, keep_ratio=c.keep_ratio, seed=c.seed, operator=c.dense_operator,
                                      s=c.sjlt_s),
}


def register_projector(kind: str, factory: Callable[[ProjectionConfig], ShardProjector]) -> None:
    """Make ``ProjectionConfig(kind=kind)`` build ``factory(cfg)``."""
    if not kind or not isinstance(kind, str):
        raise ValueError(f"projector kind must be a non-empty string, got {kind!r}")
    _REGISTRY[kind] = factory


def projector_kinds() -> list[str]:
    return sorted(_REGISTRY)


def build_projector(cfg: ProjectionConfig | None = None, **overrides) -> ShardProjector:
    """The projector ``cfg`` describes (``overrides`` replace fields: ``build_projector(kind="dense")``)."""
    import dataclasses

    if cfg is None:
        cfg = ProjectionConfig(**overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return _REGISTRY[cfg.kind](cfg)
