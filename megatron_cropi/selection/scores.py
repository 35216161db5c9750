"""Influence scores: cosine of each prompt's projected gradient with target-set directions.

For a target set ``V`` the direction is the mean projected gradient of at most ``max_prompts``
randomly chosen prompts of ``V`` that carry a gradient (projection is linear, so this is the
projection of the mean gradient). A pool prompt's score for ``V`` is
``cos(P g(s), mean_{v∈V} P g(v))``; with ``use_sign`` both sides are replaced by their signs first.
Several target sets are fused by reciprocal rank (``Σ_j 1/rank_j(s)`` over the sets whose top-m list
contains ``s``) or by the max of the cosines. Prompts without a gradient (excluded or flagged) never
score: their score is ``-inf``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["target_direction", "cosine_scores", "fuse_reciprocal_rank", "fuse_max", "top_m"]


def target_direction(features: np.ndarray, usable: np.ndarray, *, max_prompts: int = 100, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of at most ``max_prompts`` random usable rows of a target set's ``[M, k]`` features.

    Returns:
        ``(direction [k] float64, chosen row indices)``.

    Raises:
        ValueError: no usable row (every target prompt had all-equal rewards or was flagged).
    """
    rows = np.flatnonzero(usable)
    if rows.size == 0:
        raise ValueError("the target set has no prompt with a gradient (all rewards equal or flagged); "
                         "sample more responses per target prompt or use another target set")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(rows)[:max_prompts])
    return features[chosen].astype(np.float64).mean(axis=0), chosen


COSINE_CHUNK_ROWS = 256  # rows converted to float64 at a time (8 MiB at k = 4096)


def cosine_scores(features: np.ndarray, usable: np.ndarray, direction: np.ndarray, *, use_sign: bool = False
                  ) -> np.ndarray:
    """``[N]`` cosines of ``features [N, k]`` with ``direction [k]``; ``-inf`` where not usable.

    Float64 arithmetic, row by row as ``Σ f d / (‖f‖ ‖d‖)`` with numpy's pairwise sums, so a row's cosine
    does not depend on the other rows, the block size or BLAS threads. Only usable rows are read, a block
    of :data:`COSINE_CHUNK_ROWS` at a time: the pool's ``[N, k]`` matrix is never copied to float64 whole
    (on the CPU default's pool, 1,990 × 8,192, that copy and its square took ~0.8 s per call).

    Raises:
        ValueError: ``usable`` is not ``[N]``, or the direction is zero.
    """
    usable = np.asarray(usable, dtype=bool)
    if usable.shape != (features.shape[0],):
        raise ValueError(f"usable has shape {usable.shape}, expected ({features.shape[0]},): one flag per row")
    d = direction.astype(np.float64)
    if use_sign:
        d = np.sign(d)
    dn = np.linalg.norm(d)
    if dn == 0:
        raise ValueError("the target direction is exactly zero")
    out = np.full(features.shape[0], -np.inf)
    rows = np.flatnonzero(usable)
    for lo in range(0, rows.size, COSINE_CHUNK_ROWS):
        chunk = rows[lo: lo + COSINE_CHUNK_ROWS]
        f = features[chunk].astype(np.float64)
        if use_sign:
            f = np.sign(f)
        norms = np.sqrt(np.add.reduce(f * f, axis=1))  # = np.linalg.norm(f, axis=1)
        ok = norms > 0
        out[chunk[ok]] = np.add.reduce(f[ok] * d, axis=1) / (norms[ok] * dn)
    return out


def top_m(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` highest finite scores, best first (ties broken by index, stable)."""
    finite = np.flatnonzero(np.isfinite(scores))
    order = finite[np.argsort(-scores[finite], kind="stable")]
    return order[:m]


def fuse_reciprocal_rank(per_target: list[np.ndarray], m: int) -> np.ndarray:
    """``Σ_j 1/rank_j(s)`` over target sets ``j`` whose top-``m`` contains ``s`` (else 0); ``-inf``
    for prompts usable under no target."""
    n = per_target[0].shape[0]
    fused = np.zeros(n)
    for scores in per_target:
        best = top_m(scores, m)
        fused[best] += 1.0 / np.arange(1, best.size + 1)
    usable = np.any([np.isfinite(s) for s in per_target], axis=0)
    fused[~usable] = -np.inf
    return fused


def fuse_max(per_target: list[np.ndarray]) -> np.ndarray:
    """The maximum cosine over target sets."""
    return np.max(np.stack(per_target), axis=0)
