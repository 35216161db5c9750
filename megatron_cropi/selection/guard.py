"""The guard set: keep a targeted selection from trading away general ability.

A guard set ``U`` has a direction ``ḡ_U = mean_{u∈U} P g(u)`` like a target set. A candidate ``s``
*conflicts* with it when ``cos(P g(s), ḡ_U) < threshold`` (default 0: a GRPO step on ``s`` would, to
first order, lower the guard set's objective). Conflicting candidates are dropped (``mode: drop``) or
ranked after every non-conflicting one (``mode: demote``).

Guard sources (``selection.guard.source``):

* ``pool``: the pool's own usable prompts (its mean gradient is full-data GRPO's direction). Free: the
  pool's features are scored anyway; no extra rollouts.
* ``check``: the untargeted check set, rolled out by β and scored at every stage like a target set
  (its cost is charged to the run). The check set is then no longer independent of the selection:
  the untargeted delta measured on it is optimistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from megatron_cropi.config.loader import require
from megatron_cropi.selection.scores import cosine_scores, target_direction

__all__ = ["GuardConfig", "GuardResult", "guard_candidates", "guard_direction"]


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """``selection.guard``: which set guards the selection, and what happens to conflicting prompts."""

    source: Literal["none", "pool", "check"] = "none"
    """The guard set: ``none`` (off), ``pool`` (the pool's mean gradient) or ``check`` (the check set)."""
    mode: Literal["drop", "demote"] = "drop"
    """``drop``: conflicting candidates cannot be selected; ``demote``: they rank after all others."""
    threshold: float = 0.0
    """A candidate conflicts when its cosine with the guard direction is below this."""
    max_prompts: int = 0
    """Guard prompts averaged into the direction, at random (0: all with a gradient)."""

    def __post_init__(self):
        require(self.source in ("none", "pool", "check"), "source", self.source, "must be none, pool or check")
        require(self.mode in ("drop", "demote"), "mode", self.mode, "must be drop or demote")
        require(-1.0 <= self.threshold <= 1.0, "threshold", self.threshold, "must be in [-1, 1]")
        require(self.max_prompts >= 0, "max_prompts", self.max_prompts, "must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.source != "none"


@dataclass
class GuardResult:
    """What the guard did to a candidate set.

    Attributes:
        keep: ``[C]`` bool, candidates that do not conflict.
        cosine: ``[C]`` cosine of each candidate with the guard direction (``-inf``: no gradient).
        summary: counts for the stage report.
    """

    keep: np.ndarray
    cosine: np.ndarray
    summary: dict


def guard_direction(cfg: GuardConfig, guard_features: np.ndarray, guard_usable: np.ndarray, *, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(direction [k], chosen rows)``: the mean of ``max_prompts`` random usable guard rows (all of them
    for 0), with the guard's own seed stream.

    Raises:
        ValueError: the guard set has no prompt with a gradient.
    """
    return target_direction(guard_features, guard_usable, max_prompts=cfg.max_prompts or
                            max(int(np.asarray(guard_usable).sum()), 1), seed=seed + 7919)


def guard_candidates(cfg: GuardConfig, candidates: np.ndarray, features: np.ndarray | None, usable: np.ndarray,
                     guard_features: np.ndarray, guard_usable: np.ndarray, *, seed: int,
                     pool_cosines: np.ndarray | None = None) -> GuardResult:
    """Which ``candidates`` (rows of ``features [N, k]``) conflict with the guard set.

    Args:
        guard_features: ``[U, k]`` projected gradients of the guard set (the pool's own for ``pool``).
        guard_usable: ``[U]`` rows of the guard set with a gradient.
        pool_cosines: ``[N]`` the pool's cosines with :func:`guard_direction`, computed elsewhere
            (scale-out scoring); then ``features`` is not read.

    Raises:
        ValueError: the guard set has no prompt with a gradient.
    """
    direction, chosen = guard_direction(cfg, guard_features, guard_usable, seed=seed)
    cos = (pool_cosines if pool_cosines is not None else cosine_scores(features, usable, direction))[candidates]
    keep = np.isfinite(cos) & (cos >= cfg.threshold)
    summary = {"source": cfg.source, "mode": cfg.mode, "threshold": cfg.threshold,
               "guard_prompts_used": int(chosen.size), "candidates": int(candidates.size),
               "conflicting": int((~keep).sum())}
    return GuardResult(keep=keep, cosine=cos, summary=summary)
