"""The ``cropi`` selection of a sharded pool store (``scoring.scale_out``) made where the scores are.

Each rank reads its share of the store's unit files and takes the cosines of its rows with the
target (and check-guard) directions (:func:`~megatron_cropi.influence.scale_out.local_cosines`); the
guard, the fusion of several targets by ``max`` and the top ``m`` then run on those local rows
(:func:`~megatron_cropi.selection.distributed.distributed_top_m`: all-reduced counts). Only the ``m``
picked rows' ``(row, score, demoted)`` reach global rank 0, which orders them and writes the selection:
17 bytes per *selected* prompt (plus pickling) and about 70 + ⌈log2 N⌉ all-reduced counts per top-m,
against 17 bytes per *scored* pool prompt when the cosines meet on rank 0
(:func:`~megatron_cropi.influence.scale_out.pool_cosines`).

The result equals :func:`~megatron_cropi.selection.policies.select` on the met cosines, summary
included. Where the two would differ in kind (reciprocal-rank fusion of several targets with a
gradient, which ranks each target's top m; ``exclude_previous``; a guard of source ``pool``, whose
direction is the pool's mean; no prompt or no target with a gradient, where the fallback policy or the
error of ``select`` applies; a guard that keeps nothing), :func:`select_where_scored` declines and the
caller meets the cosines on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megatron_cropi.influence.scale_out import local_cosines
from megatron_cropi.selection.distributed import distributed_quantiles, distributed_top_m, global_sum
from megatron_cropi.selection.policies import COSINE_QUANTILES, SelectionConfig, TargetPlan

__all__ = ["Picked", "selects_where_scored", "select_where_scored"]


@dataclass
class Picked:
    """Rank 0's share of the result: every rank's picked ``(rows, fused scores, demoted)`` and the
    summary so far. :meth:`ordered` finishes it; the caller runs that where an error reaches every rank
    (the other ranks have left :func:`select_where_scored` by then)."""

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    summary: dict
    budget: int
    quantiles: list[float] | None

    def ordered(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """``(rows [m'], scores [m'], summary)``: the picks best first (not demoted first, then by score
        descending, then by row), and the summary as :func:`~megatron_cropi.selection.policies.select`
        writes it up to its cosine quantiles."""
        rows = np.concatenate([p[0] for p in self.parts]).astype(np.int64)
        scores = np.concatenate([p[1] for p in self.parts]).astype(np.float64)
        demoted = np.concatenate([p[2] for p in self.parts]).astype(bool)
        order = np.lexsort((rows, -scores, demoted))  # the last key sorts first
        summary = dict(self.summary)
        if summary.get("guard", {}).get("mode") == "demote" and summary["guard"]["conflicting"]:
            summary["guard"] = {**summary["guard"], "demoted_selected": int(demoted.sum())}
        if rows.size < self.budget:
            summary["shortfall"] = f"only {rows.size} prompts had a gradient; selected all of them"
        if self.quantiles is not None:
            summary["cosine_quantiles"] = dict(zip(COSINE_QUANTILES, self.quantiles))
        return rows[order], scores[order], summary


def selects_where_scored(cfg: SelectionConfig) -> bool:
    """Whether ``cfg`` may be selected by :func:`select_where_scored` (the configuration's part of the
    module docstring's conditions; the rest depend on the scores)."""
    return cfg.policy == "cropi" and not cfg.exclude_previous and cfg.guard.source in ("none", "check")


def select_where_scored(cfg: SelectionConfig, plan: TargetPlan, pool_store: Path, *, num_prompts: int, budget: int
                        ) -> tuple[bool, Picked | None]:
    """Stage selection of the ``cropi`` policy from the sharded pool store ``pool_store`` without
    meeting its rows on one rank. A collective: every rank calls it with the same values.

    Args:
        plan: rank 0's :class:`~megatron_cropi.selection.policies.TargetPlan`, on every rank.
        num_prompts: ``N``, the pool's prompts (the store's rows first, then any it does not hold).
        budget: ``m``, prompts to select.

    Returns:
        ``(done, picked)``: ``done`` is the same on every rank; False when this path declines (the
        caller then meets the cosines on rank 0). ``picked`` on global rank 0 when done, else None.
    """
    names = [n for n in plan.directions if n.startswith("target:")]
    if not selects_where_scored(cfg) or (cfg.fusion == "reciprocal_rank" and len(names) > 1):
        return False, None
    if not names or (cfg.guard.enabled and "guard" not in plan.directions):
        return False, None  # select's fallback policy or its error
    use_sign = {name: cfg.use_sign and name != "guard" for name in plan.directions}
    rows, usable, cos = local_cosines(pool_store, plan.directions, use_sign=use_sign)
    n_usable = int(global_sum([int(usable.sum())])[0])
    if n_usable == 0:
        return False, None
    summary: dict = {"pool": num_prompts, "budget": budget, "candidates": num_prompts,
                     "zero_gradient_prompts": num_prompts - n_usable}
    keep = usable.copy()
    if cfg.guard.enabled:
        guard_cos = np.where(usable, cos["guard"], -np.inf)
        conflict = usable & ~(np.isfinite(guard_cos) & (guard_cos >= cfg.guard.threshold))
        n_conflict = int(global_sum([int(conflict.sum())])[0])
        summary["guard"] = {"source": cfg.guard.source, "mode": cfg.guard.mode, "threshold": cfg.guard.threshold,
                            "guard_prompts_used": plan.guard_prompts_used, "candidates": n_usable,
                            "conflicting": n_conflict}
        if cfg.guard.mode == "drop":
            if n_conflict == n_usable:
                return False, None  # select's error names the guard
            keep &= ~conflict
            summary["guard"]["dropped"] = n_conflict
    else:
        conflict = np.zeros_like(usable)
    summary["targets"] = plan.targets
    if plan.skipped:
        summary["skipped_targets"] = plan.skipped
    per_target = [np.where(keep, cos[name], -np.inf) for name in names]
    fused = per_target[0] if len(per_target) == 1 else np.max(np.stack(per_target), axis=0)
    demoted = conflict if cfg.guard.mode == "demote" else np.zeros_like(usable)
    # non-conflicting rows first, each tier best first (select's _top_demoting)
    first = np.where(demoted, -np.inf, fused)
    picked = distributed_top_m(first, rows, budget)
    n_first = int(global_sum([int(np.isfinite(first).sum())])[0])
    if n_first < budget:
        picked |= distributed_top_m(np.where(demoted, fused, -np.inf), rows, budget - n_first)
    quantiles = distributed_quantiles(per_target[0], COSINE_QUANTILES)
    mine = (rows[picked], fused[picked], demoted[picked])
    rank = dist.get_rank()
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)  # the m picked rows, nothing else
    if rank != 0:
        return True, None
    return True, Picked(parts=parts, summary=summary, budget=budget, quantiles=quantiles)
