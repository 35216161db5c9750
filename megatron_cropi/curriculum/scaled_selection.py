"""The ``cropi`` selection of a sharded pool store (``scoring.scale_out``) made where the scores are.

Each rank reads its share of the store's unit files and takes the cosines of its rows with the
target (and check-guard) directions (:func:`~megatron_cropi.influence.scale_out.local_cosines`); the
guard, the fusion of several targets by ``max`` and the top ``m`` then run on those local rows
(:func:`~megatron_cropi.selection.distributed.distributed_top_m`: all-reduced counts). The picks stay
where they are too: every rank writes its own part of the selection, and global rank 0 reads the parts
from disk and writes a head with the summary (:func:`write_where_scored`; the format:
:mod:`~megatron_cropi.selection.stored`). What global rank 0 receives is about 70 + ⌈log2 N⌉ all-reduced
counts per top-m, whatever the pool and the number of ranks, against
17 bytes per *scored* pool prompt when the cosines meet on rank 0
(:func:`~megatron_cropi.influence.scale_out.pool_cosines`).

The result equals :func:`~megatron_cropi.selection.policies.select` on the met cosines, summary
included. Where the two would differ in kind (reciprocal-rank fusion of several targets with a
gradient, which ranks each target's top m; ``exclude_previous``; a guard of source ``pool``, whose
direction is the pool's mean; no prompt or no target with a gradient, where the fallback policy or the
error of ``select`` applies; a guard that keeps nothing), :func:`select_where_scored` declines and the
caller meets the cosines on rank 0.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megatron_cropi.influence.scale_out import local_cosines
from megatron_cropi.selection.distributed import distributed_quantiles, distributed_top_m, global_sum
from megatron_cropi.selection.policies import (COSINE_QUANTILES, Selection, SelectionConfig, SelectionInputs, TargetPlan,
                                               finish_selection)
from megatron_cropi.selection.stored import read_parts, read_selection, write_selection_head, write_selection_part
from megatron_cropi.utils.rank_zero import on_rank0

__all__ = ["LocalPicks", "selects_where_scored", "select_where_scored", "write_where_scored"]


@dataclass
class LocalPicks:
    """This rank's share of a selection made where the scores are: its picked ``rows`` (``[p_r]`` int64,
    store rows, any order), their fused ``scores`` (float64) and ``demoted`` flags, and what every rank
    knows of the whole: the ``summary`` so far, the ``budget`` and the target cosines' ``quantiles``."""

    rows: np.ndarray
    scores: np.ndarray
    demoted: np.ndarray
    summary: dict
    budget: int
    quantiles: list[float] | None


def selects_where_scored(cfg: SelectionConfig) -> bool:
    """Whether ``cfg`` may be selected by :func:`select_where_scored` (the configuration's part of the
    module docstring's conditions; the rest depend on the scores)."""
    return cfg.policy == "cropi" and not cfg.exclude_previous and cfg.guard.source in ("none", "check")


def select_where_scored(cfg: SelectionConfig, plan: TargetPlan, pool_store: Path, *, num_prompts: int, budget: int
                        ) -> tuple[bool, LocalPicks | None]:
    """Stage selection of the ``cropi`` policy from the sharded pool store ``pool_store`` without
    meeting its rows on one rank. A collective: every rank calls it with the same values.

    Args:
        plan: rank 0's :class:`~megatron_cropi.selection.policies.TargetPlan`, on every rank.
        num_prompts: ``N``, the pool's prompts (the store's rows first, then any it does not hold).
        budget: ``m``, prompts to select.

    Returns:
        ``(done, picks)``: ``done`` is the same on every rank; False when this path declines (the
        caller then meets the cosines on rank 0). ``picks``: this rank's :class:`LocalPicks` when done,
        else None; :func:`write_where_scored` writes them.
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
    return True, LocalPicks(rows=rows[picked], scores=fused[picked], demoted=demoted[picked], summary=summary,
                            budget=budget, quantiles=quantiles)


def write_where_scored(stage: int, picks: LocalPicks, inputs: SelectionInputs, path: Path, *, t0: float
                       ) -> Selection:
    """Write the selection of ``picks`` in parts (:mod:`~megatron_cropi.selection.stored`): every rank
    its own picks, then global rank 0 the head. Rank 0 reads the parts from disk and writes the summary
    :func:`~megatron_cropi.selection.policies.finish_selection` writes (selected count, overlap with
    earlier stages, mean pass rate, source mix); nothing of the picks travels between ranks. A
    collective; an error on any rank is raised on every rank.

    Args:
        inputs: the pool's ids, pass rates and sources by store row and the earlier stages' picks
            (:func:`~megatron_cropi.curriculum.steps.pool_columns`; rank 0's are read).
        t0: when the stage's selection began (``perf_counter``; the summary's ``seconds``, rank 0's).

    Returns:
        The :class:`~megatron_cropi.selection.policies.Selection` on every rank, read back from the parts.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    error = None
    try:
        write_selection_part(path, rank, picks.rows, [inputs.prompt_ids[r] for r in picks.rows], picks.scores,
                             picks.demoted)
    except OSError as err:  # every rank must learn it, not wait in the next collective
        error = f"rank {rank}: {type(err).__name__}: {err}"
    failed = int(global_sum([error is not None])[0])
    if failed:
        raise RuntimeError(f"writing the parts of selection {path}: {failed} ranks failed" +
                           (f" ({error})" if error else ""))

    def head() -> dict:
        rows, _, scores, demoted = read_parts(path, world)
        summary = dict(picks.summary)
        if summary.get("guard", {}).get("mode") == "demote" and summary["guard"]["conflicting"]:
            summary["guard"] = {**summary["guard"], "demoted_selected": int(demoted.sum())}
        if rows.size < picks.budget:
            summary["shortfall"] = f"only {rows.size} prompts had a gradient; selected all of them"
        if picks.quantiles is not None:
            summary["cosine_quantiles"] = dict(zip(COSINE_QUANTILES, picks.quantiles))
        summary = finish_selection(stage, "cropi", rows, scores, inputs, summary).summary
        summary["seconds"] = time.perf_counter() - t0
        write_selection_head(path, stage=stage, policy="cropi", parts=world, summary=summary)
        return summary

    summary = on_rank0(head)  # also the barrier: the head is on disk when anyone reads it
    # the summary as made (its keys in select's order; the file sorts them)
    return dataclasses.replace(read_selection(path), summary=summary)
