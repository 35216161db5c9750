"""The pool shortlist: score only the promising part of the pool at a stage, carry the rest.

Scoring the whole pool at every stage is CROPI's main cost at scale (``docs/at_scale.md`` §3). Ranks
move slowly from one checkpoint to the next, so a stage m > 0 may score only a shortlist:

* the ``fraction`` of the pool's *live* prompts (those with a gradient under the behaviour rollouts;
  the others are never scored anyway) that ranked best by the carried score ``r_{m-1}``, less an
  ``explore`` share drawn at random from the rest, so that a prompt can climb back;
* never fewer than the selection's budget;
* the whole live pool at stage 0, at every ``full_every``-th stage, and whenever no ranking is carried.

The carried score is ``r_m(s) = score_m(s)`` for the prompts scored at stage m and ``r_{m-1}(s)`` for
the others: the ranking of the whole pool, refreshed where it was rescored. Prompts never ranked
(new after a behaviour refresh) are always on the shortlist.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from megatron_cropi.config.loader import require

__all__ = ["ShortlistConfig", "shortlist_mask", "carry_ranking"]


@dataclass(frozen=True, kw_only=True)
class ShortlistConfig:
    """``scoring.shortlist``: which part of the pool each stage scores."""

    fraction: float = 1.0
    """Share of the live pool scored at a shortlisted stage (1.0: the whole pool every stage, off)."""
    explore: float = 0.1
    """Share of the shortlist drawn at random from the prompts outside the carried top."""
    full_every: int = 0
    """Score the whole live pool at every this-many-th stage (0: only at stage 0)."""

    def __post_init__(self):
        require(0 < self.fraction <= 1, "fraction", self.fraction, "must be in (0, 1]")
        require(0 <= self.explore <= 1, "explore", self.explore, "must be in [0, 1]")
        require(self.full_every >= 0, "full_every", self.full_every, "must be >= 0 (0: only stage 0)")

    @property
    def enabled(self) -> bool:
        return self.fraction < 1.0

    def scores_everything(self, m: int) -> bool:
        """Whether stage ``m`` scores the whole live pool."""
        return not self.enabled or m == 0 or (self.full_every > 0 and m % self.full_every == 0)


def _rng(seed: int, m: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"shortlist:{seed}:{m}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def shortlist_mask(cfg: ShortlistConfig, m: int, prompt_ids: Sequence[str], live: np.ndarray,
                   carried: Mapping[str, float] | None, *, min_rows: int, seed: int) -> np.ndarray:
    """``[N]`` bool: the store rows stage ``m`` scores (a subset of ``live``).

    Args:
        prompt_ids: ``[N]`` the pool store's prompt ids, in row order.
        live: ``[N]`` bool, rows with a gradient under the behaviour rollouts (not all rewards equal).
        carried: the carried score ``r_{m-1}`` by prompt id (None: score everything).
        min_rows: the shortlist holds at least this many live rows (the selection's budget).
        seed: the run's seed (the exploration draw is ``hash(seed, m)``).
    """
    live = np.asarray(live, dtype=bool)
    if carried is None or cfg.scores_everything(m):
        return live.copy()
    rows = np.flatnonzero(live)
    size = min(rows.size, max(int(math.ceil(cfg.fraction * rows.size)), min_rows))
    unranked = np.array([i for i in rows if prompt_ids[i] not in carried], dtype=np.int64)
    ranked = np.array([i for i in rows if prompt_ids[i] in carried], dtype=np.int64)
    # best carried score first; ties by row (stable)
    ranked = ranked[np.argsort(-np.array([carried[prompt_ids[i]] for i in ranked], dtype=np.float64), kind="stable")]
    explore = int(round(cfg.explore * size))
    top = max(size - explore - unranked.size, 0)
    chosen = list(unranked[:size]) + list(ranked[:top])
    rest = ranked[top:]
    extra = size - len(chosen)
    if extra > 0 and rest.size:
        chosen += list(_rng(seed, m).choice(rest, size=min(extra, rest.size), replace=False))
    mask = np.zeros(live.shape, dtype=bool)
    mask[np.asarray(chosen, dtype=np.int64)] = True
    return mask


def carry_ranking(carried: Mapping[str, float] | None, prompt_ids: Sequence[str], scores: np.ndarray,
                  scored: np.ndarray) -> dict[str, float]:
    """``r_m``: ``scores [N]`` where ``scored [N]`` (and finite), else the carried ``r_{m-1}``."""
    out = dict(carried or {})
    for i in np.flatnonzero(np.asarray(scored, dtype=bool)):
        if np.isfinite(scores[i]):
            out[prompt_ids[i]] = float(scores[i])
        else:
            out.pop(prompt_ids[i], None)
    return out
