"""The bodies of the controller's scoring and selection steps (behaviour rollouts: :mod:`.behaviour`),
and their log lines. Each gets its inputs as values and returns its outputs.

Files they read and write are named by the run's :class:`~megatron_cropi.layout.RunLayout`; the
controller decides which steps still have to run (``state.json``), charges their time to the run
clock and marks them done. Nothing here knows about the controller.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.distributed as dist

from megatron_cropi.influence.feature_store import DONE, FeatureStore
from megatron_cropi.influence.scale_out import pool_cosines, score_store_sharded
from megatron_cropi.influence.sharded_store import is_sharded_store
from megatron_cropi.influence.stores import open_complete_store, score_store
from megatron_cropi.layout import RunLayout
from megatron_cropi.rollout.store import TrajectoryStore
from megatron_cropi.records import PromptRecord
from megatron_cropi.influence.shortlist import ShortlistConfig, carry_ranking, shortlist_mask
from megatron_cropi.curriculum.scaled_selection import select_where_scored, selects_where_scored, write_where_scored
from megatron_cropi.selection import stored
from megatron_cropi.selection.guard import GuardConfig
from megatron_cropi.selection.scores import COSINE_CHUNK_ROWS
from megatron_cropi.selection.policies import (
    Selection,
    SelectionConfig,
    SelectionInputs,
    pool_directions,
    target_plan,
    ranking_scores,
    select,
    selection_budget,
)
from megatron_cropi.utils.atomic import atomic_write_json
from megatron_cropi.utils.rank_zero import on_rank0, share_from_rank0

__all__ = ["stage_selection", "feature_set_names", "read_selection", "read_ranking", "selected_prompts", "previous_selections",
           "selection_inputs", "pool_columns", "pool_is_sharded", "select_stage", "hold_selection", "pool_shortlist", "score_set",
           "score_line", "select_line"]


def stage_selection(cfg: SelectionConfig, selects: bool) -> SelectionConfig:
    """The selection a stage makes: ``cfg`` where the stage selects (``curriculum.selected_stages``), else
    the whole pool (policy ``full``, ratio 1, no guard), which needs no behaviour rollouts or scoring."""
    if selects:
        return cfg
    return dataclasses.replace(cfg, policy="full", ratio=1.0, guard=GuardConfig(), exclude_previous=False)


def feature_set_names(target_families: Sequence[str], *, guard: bool = False) -> list[str]:
    """The sets scored at every stage: ``pool``, ``target-<family>`` for each target set, and ``guard``
    (the check set, when ``selection.guard.source`` is ``check``)."""
    return ["pool"] + [f"target-{t}" for t in sorted(target_families)] + (["guard"] if guard else [])


def read_selection(path: Path) -> Selection | None:
    """The selection written at ``path`` (whole or in parts: :mod:`~megatron_cropi.selection.stored`), or
    None when there is none yet."""
    return stored.read_selection(path)


def read_ranking(layout: RunLayout, m: int) -> dict[str, float] | None:
    """The carried influence scores after stage ``m`` (``{prompt id: score}``), or None (no such stage,
    or it made no cropi selection)."""
    path = layout.ranking(m)
    return json.loads(path.read_text())["scores"] if m >= 0 and path.exists() else None


def selected_prompts(pool: Sequence[PromptRecord], selection: Selection) -> list[PromptRecord]:
    """The pool's records of the selected prompt ids, in selection order.

    Raises:
        RuntimeError: the selection names a prompt the pool no longer has.
    """
    by_id = {p.prompt_id: p for p in pool}
    missing = [i for i in selection.prompt_ids if i not in by_id]
    if missing:
        raise RuntimeError(f"selection of stage {selection.stage} names {len(missing)} prompts not in the pool "
                           f"(e.g. {missing[0]}); the pool changed since it was made")
    return [by_id[i] for i in selection.prompt_ids]


def previous_selections(layout: RunLayout, m: int) -> set[str]:
    """Prompt ids selected by any stage before ``m``."""
    out: set[str] = set()
    for j in range(m):
        prev = read_selection(layout.selection(j))
        out |= set(prev.prompt_ids) if prev else set()
    return out


def _usable(fs: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, k], usable [N])``: usable rows are done and not all zero. Only done rows are read, a
    block at a time (an ``abs`` copy of the whole matrix took ~0.3 s of the CPU default's selection)."""
    features = fs.matrix()
    usable = fs.statuses() == DONE
    rows = np.flatnonzero(usable)
    for lo in range(0, rows.size, COSINE_CHUNK_ROWS):
        block = rows[lo: lo + COSINE_CHUNK_ROWS]
        usable[block] = np.abs(features[block]).sum(1) > 0
    return features, usable


def selection_inputs(pool: Sequence[PromptRecord], *, pool_rollouts: Path | None, features: dict[str, Path],
                     previous: set[str], pool_cosines: tuple | None = None) -> SelectionInputs:
    """What a selection policy reads: the pool's ids, sources and pass rates (from the trajectory store
    ``pool_rollouts``, when there is one: β's, or θ_m's for ``online_learnability``), and the pool's and
    target sets' features when ``features`` names them.

    Rows follow the store (the feature stores' row order); pool prompts the store does not hold (a
    partial online roll-out) follow in prompt-id order with pass rate NaN.

    ``pool_cosines``: ``(usable [N], {direction: cosines [N]})`` of a sharded pool store
    (:func:`scale_out_cosines`); its features are then not read."""
    if pool_rollouts is not None and pool_rollouts.exists():
        # column-wise: building every group's rollouts took 0.15-0.6 s on the CPU default's pool, this 0.015 s
        inputs = pool_columns(pool, pool_rollouts, previous, verify=pool_cosines is None)
    else:  # full / random need no rollouts
        ordered = sorted(pool, key=lambda p: p.prompt_id)
        inputs = SelectionInputs(prompt_ids=[p.prompt_id for p in ordered], pass_rates=np.full(len(ordered), np.nan),
                                 sources=[p.source for p in ordered], previous=previous)
    if features:
        if pool_cosines is not None:
            inputs.usable, inputs.cosines = pool_cosines
        else:
            inputs.features, inputs.usable = _usable(FeatureStore.load(features["pool"]))
        for name, path in features.items():
            if name.startswith("target-"):
                inputs.targets[name[len("target-"):]] = _usable(FeatureStore.load(path))
            elif name == "guard":
                inputs.guard = _usable(FeatureStore.load(path))
    return inputs


def pool_columns(pool: Sequence[PromptRecord], pool_rollouts: Path, previous: set[str], *,
                 verify: bool = False) -> SelectionInputs:
    """The pool's ids, pass rates and sources read column-wise from the trajectory store ``pool_rollouts``
    (its rollouts are never loaded), then the pool prompts it does not hold (pass rate NaN).

    ``verify``: check every part's checksum and that the store is complete (one process reading the
    store; scale-out verifies on one rank and reads unverified on every rank).

    Raises:
        RuntimeError: ``verify`` and the store is not complete (its rollouts were interrupted).
    """
    store = open_complete_store(pool_rollouts) if verify else TrajectoryStore.open(pool_rollouts, verify=False)
    rates, sources = store.pass_rates_and_sources()
    rest = sorted((p for p in pool if p.prompt_id not in store), key=lambda p: p.prompt_id)
    if not rest:  # the usual case: compact columns (ids decoded when read, sources as codes), no lists of N
        return SelectionInputs(prompt_ids=store.prompt_id_view(), pass_rates=rates, sources=sources, previous=previous)
    return SelectionInputs(prompt_ids=store.prompt_ids() + [p.prompt_id for p in rest],
                           pass_rates=np.concatenate([rates, np.full(len(rest), np.nan)]),
                           sources=list(sources) + [p.source for p in rest], previous=previous)


def pool_shortlist(cfg: ShortlistConfig, m: int, carried: dict[str, float] | None, *, budget: int, seed: int):
    """The ``shortlist`` callback of :func:`~megatron_cropi.influence.stores.score_store` for stage ``m``'s
    pool: given the groups as scored, the rows to score (None when the stage scores every live row)."""
    if carried is None or cfg.scores_everything(m):
        return None

    def choose(groups_list) -> np.ndarray:
        live = ~np.array([g.zero_variance for g in groups_list], dtype=bool)
        return shortlist_mask(cfg, m, [g.prompt_id for g in groups_list], live, carried, min_rows=budget, seed=seed)

    return choose


def score_set(store: Path, out: Path, scorer, *, sharded: bool, shortlist=None, on_unit=None):
    """Projected POPI gradients of the trajectory store ``store`` into the feature store ``out``: sharded
    over the replicas with a shared queue (``sharded``: ``scoring.scale_out`` on the pool;
    :func:`~megatron_cropi.influence.scale_out.score_store_sharded`), else whole, scoring the rows
    ``shortlist`` (:func:`pool_shortlist`) keeps (:func:`~megatron_cropi.influence.stores.score_store`).
    ``on_unit()`` after each unit or chunk. Returns the :class:`~megatron_cropi.influence.scorer.ScoreStats`."""
    if sharded:
        return score_store_sharded(store, out, scorer, on_unit=on_unit)
    return score_store(store, out, scorer, on_chunk=on_unit, shortlist=shortlist)


def score_line(m: int, name: str, stats) -> str:
    """The log line of set ``name`` scored at stage ``m`` (``stats``: :func:`score_set`'s)."""
    return (f"[score] stage {m} {name}: {stats.scored} scored, {stats.excluded} zero-variance excluded, "
            + (f"{stats.shortlisted_out} left out by the shortlist, " if stats.shortlisted_out else "")
            + f"{stats.flagged} flagged, {stats.seconds:.1f} s ({1e3 * stats.seconds_per_prompt:.1f} ms/prompt)")


def select_line(m: int, selection: Selection) -> str:
    """The log line of stage ``m``'s selection: its size, policy and first six sources of its mix."""
    held = selection.summary.get("held_from_stage")
    how = f"{selection.policy}, stage {held}'s again (curriculum.select_every)" if held is not None else selection.policy
    return (f"[select] stage {m}: {len(selection.prompt_ids)} prompts by {how}; mix "
            f"{dict(list(selection.summary['source_mix'].items())[:6])}")


def _target_sets(features: dict[str, Path]):
    """Rank 0: ``({name: (features, usable)}, guard (features, usable) or None)`` of the small target and
    check-guard stores."""
    targets = {name[len("target-"):]: _usable(FeatureStore.load(path)) for name, path in features.items()
               if name.startswith("target-")}
    return targets, (_usable(FeatureStore.load(features["guard"])) if "guard" in features else None)


def pool_is_sharded(features: dict[str, Path]) -> bool:
    """Whether the pool's feature store is sharded (``scoring.scale_out``), as rank 0 finds it, on every
    rank. A collective."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    return bool(features) and bool(share_from_rank0(is_sharded_store(features["pool"]) if rank0 else None))


def scale_out_cosines(cfg: SelectionConfig, features: dict[str, Path], *, seed: int) -> tuple | None:
    """For a sharded pool store (``scoring.scale_out``), every rank's share of the pool's cosines with the
    target (and check-guard) directions, met on rank 0 (:func:`~megatron_cropi.influence.scale_out.pool_cosines`);
    None for an ordinary store. A collective when the store is sharded."""
    if not pool_is_sharded(features):
        return None
    found = on_rank0(lambda: pool_directions(cfg, *_target_sets(features), seed=seed))
    # the guard's cosine is plain (guard.py), the targets' follow selection.use_sign
    return pool_cosines(features["pool"], found, use_sign={name: cfg.use_sign and name != "guard" for name in found})


def _select_where_scored(m: int, *, layout: RunLayout, pool: Sequence[PromptRecord], cfg: SelectionConfig,
                         seed: int, features: dict[str, Path], pool_rollouts: Path, t0: float) -> Selection | None:
    """Stage ``m``'s cropi selection of a sharded pool store made where its cosines are and written in
    parts (:mod:`.scaled_selection`); None on every rank when that path declines. Every rank reads the
    pool's columns (ids, pass rates, sources) itself, so none of them travels."""
    plan = on_rank0(lambda: target_plan(cfg, *_target_sets(features), seed=seed))
    inputs = pool_columns(pool, pool_rollouts, previous_selections(layout, m))
    budget = selection_budget(cfg, len(inputs.prompt_ids))  # the same error, if any, on every rank
    done, picks = select_where_scored(cfg, plan, features["pool"], num_prompts=len(inputs.prompt_ids),
                                      budget=budget)
    if not done:
        return None
    return write_where_scored(m, picks, inputs, layout.selection(m), t0=t0)


def hold_selection(layout: RunLayout, m: int, source: int) -> Selection:
    """Stage ``m``'s selection when it holds stage ``source``'s (``curriculum.select_every``): the same
    prompts, rows, scores and summary (with ``held_from_stage``), written whole to ``selections/stage{m}.json``
    on global rank 0 and returned on every rank.

    Raises:
        RuntimeError: stage ``source`` has no selection on disk.
    """

    def copy() -> Selection:
        t0, held = time.perf_counter(), read_selection(layout.selection(source))
        if held is None:
            raise RuntimeError(f"stage {m} holds stage {source}'s selection (curriculum.select_every), but "
                               f"{layout.selection(source)} does not exist")
        result = Selection(stage=m, policy=held.policy, rows=list(held.rows), prompt_ids=list(held.prompt_ids),
                           scores=list(held.scores),
                           summary={**held.summary, "held_from_stage": source, "seconds": time.perf_counter() - t0})
        stored.write_selection(layout.selection(m), result)
        return result

    return on_rank0(copy)


def select_stage(m: int, *, layout: RunLayout, pool: Sequence[PromptRecord], cfg: SelectionConfig, seed: int,
                 features: dict[str, Path], pool_rollouts: Path | None) -> Selection:
    """Choose stage ``m``'s prompts, write ``selections/stage{m}.json`` (and, for cropi met on rank 0,
    ``rankings/stage{m}.json``) on global rank 0, and return the selection on every rank (an error, if
    any, is raised on every rank).

    A cropi selection of a sharded pool store (``scoring.scale_out``) is made where the cosines are
    (:mod:`.scaled_selection`) and keeps no ranking (the shortlist, its reader, is refused under
    scale-out); other policies and the cases that path declines meet the cosines on rank 0 (the unit
    files are then read a second time).

    ``pool_rollouts``: the trajectory store the pass rates come from (β's pool store, the stage's
    θ_m store for ``online_learnability``, or None)."""

    t0 = time.perf_counter()
    sharded = pool_is_sharded(features)
    if sharded and pool_rollouts is not None and pool_rollouts.exists() and selects_where_scored(cfg):
        result = _select_where_scored(m, layout=layout, pool=pool, cfg=cfg, seed=seed, features=features,
                                      pool_rollouts=pool_rollouts, t0=t0)
        if result is not None:
            return result
    cosines = scale_out_cosines(cfg, features, seed=seed) if sharded else None

    def choose() -> Selection:
        inputs = selection_inputs(pool, pool_rollouts=pool_rollouts, features=features,
                                  previous=previous_selections(layout, m), pool_cosines=cosines)
        result = select(cfg, inputs, stage=m, seed=seed)
        if cfg.policy == "cropi" and (inputs.features is not None or inputs.cosines is not None):
            scores = ranking_scores(cfg, inputs, seed=seed)
            ranking = carry_ranking(read_ranking(layout, m - 1), inputs.prompt_ids, scores, inputs.usable)
            atomic_write_json(layout.ranking(m), {"stage": m, "scores": ranking})
        result.summary["seconds"] = time.perf_counter() - t0
        stored.write_selection(layout.selection(m), result)
        return result

    return on_rank0(choose)
