"""Scoring that scales out: replicas read their own rows, write their own shards, take work from a queue.

:func:`score_store_sharded` scores a trajectory store into a
:class:`~megatron_cropi.influence.sharded_store.ShardedFeatureStore`:

* **plan from scalars, once.** Global rank 0 reads three scalars per row column-wise
  (:meth:`~megatron_cropi.rollout.store.TrajectoryStore.row_summary`: longest sequence, tokens,
  all-equal rewards) and computes the schedule calls
  (:func:`~megatron_cropi.influence.scorer.plan_calls`, independent of the number of replicas); a unit is
  one call. It writes them with the store (:class:`~megatron_cropi.influence.sharded_store.UnitPlan`) and
  every rank maps that file: no rank keeps a per-row plan, and the store's own index is memory-mapped too
  (:mod:`~megatron_cropi.rollout.store_index`), so a rank's private memory does not grow with the pool.
  The rollouts stay on disk: a replica reads the groups of the units it scores and nothing else.
* **a shared queue.** The first rank of each replica (TP rank 0, PP rank 0) takes the next unit number
  from a counter in the job's key-value store (:func:`~megatron_cropi.parallel.work_counter`) and
  passes it to the replica's other ranks; a slow replica takes fewer units and nobody waits for it
  until the end.
* **own shard, nothing gathered.** The replica writes the unit's k-vectors to its shard of the store
  (one atomic file per unit). Units already on disk are not queued again, so a killed run resumes with
  any number of replicas and the same result.

:func:`local_cosines` is what selection needs from the pool: the cosine of every row with a few
directions, computed where the row's features are (each rank reads a share of the unit files). The
``cropi`` policy selects from them where they are
(:mod:`~megatron_cropi.curriculum.scaled_selection`: a distributed top-m, counts meet); the other
policies meet them on rank 0 (:func:`pool_cosines`: per scored row a row id, a usable flag and a
float64 cosine per direction, 8 + 1 + 8 bytes for one direction, instead of the 4k bytes of a float32
k-vector).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_cropi.influence.feature_store import DONE, FLAGGED, hash_strings
from megatron_cropi.influence.scorer import ScoreStats, capture_call, make_capture, plan_calls, trims_padding_rows
from megatron_cropi.influence.sharded_store import ShardedFeatureStore, UnitPlan
from megatron_cropi.influence.stores import PolicyScorer, open_complete_store
from megatron_cropi.parallel import broadcast_in_replica, work_counter
from megatron_cropi.popi.buckets import ScheduleCall, padded_tokens
from megatron_cropi.rollout.store import TrajectoryStore
from megatron_cropi.selection.distributed import global_sum
from megatron_cropi.selection.scores import cosine_scores
from megatron_cropi.utils.rank_zero import on_rank0, share_from_rank0

__all__ = ["score_store_sharded", "local_cosines", "pool_cosines"]


def _open_rollouts(path: Path) -> TrajectoryStore:
    """Rank 0 verifies every part of the store and keeps it open; the others open it without reading it
    whole once rank 0 found it complete (its error, if any, is raised on every rank)."""
    verified: list[TrajectoryStore] = []

    def verify() -> None:
        verified.append(open_complete_store(path))

    on_rank0(verify)
    return verified[0] if verified else TrajectoryStore.open(path, verify=False)


def score_store_sharded(rollouts_dir: Path, out: Path, scorer: PolicyScorer, *, max_units: int | None = None,
                        on_unit=None) -> ScoreStats:
    """Projected POPI gradients of the trajectory store ``rollouts_dir`` into the sharded store ``out``.

    A collective: every rank calls it. Features equal :func:`~megatron_cropi.influence.stores.score_store`'s
    row for row (the same calls, the same capture).

    Args:
        max_units: each replica stops after this many units (tests of resume).
        on_unit: called on every rank after each unit its replica wrote (fault injection in tests).

    Returns:
        :class:`~megatron_cropi.influence.scorer.ScoreStats` summed over replicas, the same on every rank.
    """
    t0 = time.perf_counter()
    g, cfg = scorer.groups, scorer.cfg
    store = _open_rollouts(Path(rollouts_dir))
    sampling = store.header.sampling_params
    k = sampling.n
    cap = cfg.max_responses_per_prompt if cfg.max_responses_per_prompt and cfg.max_responses_per_prompt < k else 0
    k = cap or k

    def plan_units() -> None:  # rank 0: the per-row work, once; the others map the plan it writes
        summary = store.row_summary(cap)
        live = np.flatnonzero(~summary["zero_variance"])
        seq = cfg.seq_length or int(summary["longest"].max(initial=1))
        calls = plan_calls(summary["longest"][live], cfg, responses_per_prompt=k, seq_length=seq)
        plan_hash = hash_strings(f"{c.seq_length}/{c.prompts_per_microbatch}:" + ",".join(map(str, live[c.indices]))
                                 for c in calls)
        ends = np.cumsum([len(c.indices) for c in calls], dtype=np.int64)
        rows = live[np.concatenate([c.indices for c in calls])] if calls else np.zeros(0, np.int64)
        units = np.stack([ends - [len(c.indices) for c in calls], ends, [c.seq_length for c in calls],
                          [c.prompts_per_microbatch for c in calls],
                          [int(summary["tokens"][live[c.indices]].sum()) for c in calls]], 1) if calls \
            else np.zeros((0, 5), np.int64)
        ShardedFeatureStore.open(out, scorer.header_for(store.prompt_id_view()),
                                 excluded=np.flatnonzero(summary["zero_variance"]), plan_hash=plan_hash,
                                 plan=UnitPlan(units.astype(np.int64), rows.astype(np.int64)))

    on_rank0(plan_units)
    shards = ShardedFeatureStore.load(out)
    plan = shards.unit_plan()  # memory-mapped: no rank holds the pool's per-row plan
    done = np.asarray(share_from_rank0(sorted(shards.done_units()) if g.rank == 0 else None), np.int64)
    pending = np.setdiff1d(np.arange(len(plan), dtype=np.int64), done)
    counter = work_counter(f"score/{share_from_rank0(uuid.uuid4().hex)}")
    capture = make_capture(scorer.model, g, scorer.projector, cfg, sampling.logprob_temperature)
    trim, lead = trims_padding_rows(cfg, g), g.tp_rank == 0 and g.pp_rank == 0
    # per replica: [scored, flagged, tokens, padded tokens, units]; summed over the leads at the end
    mine = np.zeros(5, np.int64)
    while True:
        take = 0
        if lead:  # only the replica's first rank draws from the queue; the others learn the number from it
            take = -1 if max_units is not None and mine[4] >= max_units else counter.take()
        index = broadcast_in_replica(take, g)
        if index < 0 or index >= len(pending):
            break
        unit = int(pending[index])
        rows, seq, ppm, tokens = plan.unit(unit)
        call = ScheduleCall(rows, seq, ppm)
        groups_list = [store.group_at(int(r)) for r in rows]
        if cap:
            groups_list = [dataclasses.replace(x, responses=x.responses[:cap], rewards=x.rewards[:cap])
                           for x in groups_list]
        result = capture_call(capture, groups_list, call, responses_per_prompt=k, pad_id=scorer.pad_id,
                              trim_rows=trim)
        finite = result.finite.numpy()
        if lead:
            shards.write_unit(g.dp_rank, unit, rows, result.sketches.numpy(),
                              np.where(finite, DONE, FLAGGED).astype(np.uint8))
            mine += [rows.size, int((~finite).sum()), tokens, padded_tokens(call, k, padding_rows=not trim), 1]
        if on_unit is not None:
            on_unit()
    totals = torch.tensor(mine if lead else np.zeros(5, np.int64), dtype=torch.int64, device=g.device)
    dist.all_reduce(totals)  # also the barrier: every unit is on disk when anyone returns
    scored, flagged, tokens, padded, _ = (int(v) for v in totals.tolist())
    skipped = int(sum(plan.units[u, 1] - plan.units[u, 0] for u in done.tolist()))
    return ScoreStats(rows=shards.header.num_rows, scored=scored, excluded=len(shards.excluded_rows()),
                      flagged=flagged, skipped_done=skipped, seconds=time.perf_counter() - t0, tokens=tokens,
                      padded_tokens=padded)


def local_cosines(path: Path, directions: dict[str, np.ndarray], *, use_sign: dict[str, bool] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """This rank's share of the rows of the sharded store ``path`` and their cosines with each of
    ``directions`` (``{name: [k]}``, rank 0's): rank 0 lists the unit files and rank ``r`` reads files
    ``r, r + W, …`` of that list. Nothing but the list and the directions crosses ranks.

    A collective. An error on any rank (an unreadable unit, a zero direction) is raised on every rank,
    and so is a store whose scoring did not finish (a row in no unit and not excluded: the rows of all
    units plus the excluded ones must make up the store).

    Args:
        use_sign: per direction, compare signs (``selection.use_sign``); default False for all.

    Returns:
        ``(rows [n_r] int64, usable [n_r] bool, {name: cosines [n_r] float64, -inf where not usable})``,
        as :func:`~megatron_cropi.selection.scores.cosine_scores` gives them.
    """
    store = ShardedFeatureStore.load(path)
    world, rank = dist.get_world_size(), dist.get_rank()
    directions = share_from_rank0(directions if rank == 0 else None)
    files = share_from_rank0([str(f) for f in store.unit_files()] if rank == 0 else None)
    use_sign = use_sign or {}
    rows, usable, cos, error = [], [], {name: [] for name in directions}, None
    try:
        for unit in store.iter_units([Path(f) for f in files[rank::world]]):
            ok = (unit.status == DONE) & (np.abs(unit.features).sum(1) > 0)
            rows.append(unit.rows)
            usable.append(ok)
            for name, d in directions.items():
                cos[name].append(cosine_scores(unit.features, ok, d, use_sign=use_sign.get(name, False)))
    except Exception as err:  # noqa: BLE001 - every rank must learn it, not wait in a collective
        error = f"rank {rank}: {type(err).__name__}: {err}"
    cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    local = (cat(rows, np.int64), cat(usable, bool), {n: cat(v, np.float64) for n, v in cos.items()})
    failed, covered = global_sum([error is not None, 0 if error else local[0].size])
    if failed:
        messages = [None] * world if rank == 0 else None
        dist.gather_object(error, messages, dst=0)  # only when something failed
        failures = share_from_rank0([m for m in messages if m] if rank == 0 else None)
        raise RuntimeError(f"pool cosines of the sharded feature store {path}: " + "; ".join(failures))
    missing = store.header.num_rows - len(store.excluded_rows()) - int(covered)
    if missing:
        raise RuntimeError(f"pool cosines of the sharded feature store {path}: {missing} of "
                           f"{store.header.num_rows} rows are in no unit and not excluded: the store's scoring "
                           "did not finish (rerun to resume it)")
    return local


def pool_cosines(path: Path, directions: dict[str, np.ndarray], *, use_sign: dict[str, bool] | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """Every row's cosine with each of ``directions``, computed where the features are
    (:func:`local_cosines`) and met on rank 0: 8 + 1 + 8 × directions bytes per scored row. What the
    selection policies that need the whole pool's scores on one rank read; ``cropi`` under scale-out
    selects without it (:mod:`megatron_cropi.curriculum.scaled_selection`).

    A collective; errors as :func:`local_cosines` raises them, on every rank.

    Returns:
        On global rank 0: ``(usable [N] bool, {name: cosines [N] float64, -inf where not usable})``,
        as :func:`~megatron_cropi.selection.scores.cosine_scores` gives them; None on the other ranks.
    """
    local = local_cosines(path, directions, use_sign=use_sign)
    rank = dist.get_rank()
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    return _assemble(ShardedFeatureStore.load(path), list(local[2]), gathered) if rank == 0 else None


def _assemble(store: ShardedFeatureStore, names: list[str], parts: list[tuple]):
    """Rank 0: the gathered ``(rows, usable, cosines)`` as ``[N]`` arrays (every row is covered:
    :func:`local_cosines` checked it)."""
    n = store.header.num_rows
    all_usable = np.zeros(n, bool)
    all_cos = {name: np.full(n, -np.inf) for name in names}
    for r, u, c in parts:
        all_usable[r] = u
        for name in names:
            all_cos[name][r] = c[name]
    return all_usable, all_cos
