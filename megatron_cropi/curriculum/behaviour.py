"""Behaviour rollouts: the sets rolled out by β once (and again at θ_m by a refresh), and the online
pool rollouts of ``online_learnability``, with their log lines. Functions of values; the controller
decides when they run (by
:func:`~megatron_cropi.selection.policies.uses_behaviour_rollouts` and :func:`is_refresh_stage`).
β's stores may instead come from another run whose stores match (:mod:`.reuse`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_cropi.curriculum.faults import fault_point
from megatron_cropi.records import PromptRecord, SamplingParams
from megatron_cropi.utils.rank_zero import on_rank0

__all__ = ["behaviour_sets", "run_behaviour_sets", "roll_out_sets", "behaviour_sampling", "behaviour_header",
           "behaviour_rollouts", "online_sampling", "online_pool_subset", "online_pool_rollouts", "refresh_stage_of",
           "is_refresh_stage", "rollouts_line", "rolled_out_record", "rollouts_line_of", "online_line"]


def behaviour_sets(pool: Sequence[PromptRecord], targets: dict[str, list[PromptRecord]], check: Sequence[PromptRecord],
                   *, pool_samples: int, target_samples: int, guard_check: bool) -> list[tuple[str, list, int]]:
    """``(name, prompts, responses per prompt)`` of every set the behaviour policy rolls out: the pool,
    each target set (``target-<family>``), and the check set as ``guard`` when ``guard_check``
    (``selection.guard.source: check``), with the target sets' response count."""
    sets = [("pool", list(pool), pool_samples)] + [
        (f"target-{t}", list(recs), target_samples) for t, recs in sorted(targets.items())]
    if guard_check:
        sets.append(("guard", list(check), target_samples))
    return sets


def run_behaviour_sets(cfg, prompts) -> list[tuple[str, list, int]]:
    """:func:`behaviour_sets` of a run: its config's counts and guard, its ``PromptSets``."""
    curriculum = cfg.curriculum
    return behaviour_sets(prompts.pool, prompts.targets, prompts.check, pool_samples=curriculum.pool_samples,
                          target_samples=curriculum.target_samples, guard_check=cfg.selection.guard.source == "check")


def behaviour_sampling(base: SamplingParams, n: int, *, temperature: float | None,
                       max_tokens: int | None, refresh_stage: int = 0) -> SamplingParams:
    """β's sampling: GRPO's ``base`` with ``n`` responses, and ``curriculum.behaviour_temperature`` /
    ``behaviour_max_tokens`` where set (the paper rolls β out at T = 0.5, GRPO at T = 1).

    ``refresh_stage`` m > 0: the behaviour refresh at θ_m, the same sampling with a seed of its own,
    ``hash(base.seed, m)``."""
    seed = base.seed if refresh_stage == 0 else _stage_seed("refresh", base.seed, refresh_stage)
    return dataclasses.replace(base, n=n, temperature=base.temperature if temperature is None else temperature,
                               max_tokens=base.max_tokens if max_tokens is None else max_tokens, seed=seed)


def refresh_stage_of(m: int, every: int) -> int:
    """The stage whose behaviour rollouts stage ``m`` scores with: the last refresh at or before ``m``
    (``curriculum.refresh_behaviour_every``; 0: never, β's rollouts of stage 0)."""
    return 0 if every <= 0 else (m // every) * every


def is_refresh_stage(m: int, every: int) -> bool:
    """Whether stage ``m`` rolls the behaviour sets out again (``curriculum.refresh_behaviour_every``): a
    stage ``m > 0`` that is its own :func:`refresh_stage_of`."""
    return m != 0 and refresh_stage_of(m, every) == m


def behaviour_header(path: Path, prompts: Sequence[PromptRecord], *, sampling: SamplingParams, tokenizer,
                     policy: str, engine_kind: str, reward_cfg):
    """The :class:`~megatron_cropi.rollout.store.StoreHeader` of the behaviour store at ``path``: what the
    store is checked against on resume and what a reused store must equal (:mod:`.reuse`)."""
    from megatron_cropi.curriculum.reuse import reward_identity
    from megatron_cropi.data.prompt_ids import pool_hash
    from megatron_cropi.rollout.store import StoreHeader

    return StoreHeader.build(sampling, tokenizer=tokenizer.identity, model=policy, policy_version=0,
                             num_prompts=len(prompts), engine=engine_kind,
                             pool_hash=pool_hash(p.prompt_id for p in prompts),
                             extra={"set": path.name, "reward": reward_identity(reward_cfg)})


def behaviour_rollouts(name: str, prompts: Sequence[PromptRecord], path: Path, *, sampling: SamplingParams, engine,
                       reward_fn, tokenizer, groups, batch_prompts: int, policy: str, engine_kind: str,
                       progress: bool):
    """Roll ``prompts`` out with β into the trajectory store at ``path`` (resumes a partial store).

    Args:
        policy: β's identity for the store header (:func:`~megatron_cropi.wiring.policy_identity`).
        reward_fn: the reward function (used on global rank 0, which writes the store).

    Returns:
        :class:`~megatron_cropi.rollout.runner.RolloutSummary`.
    """
    from megatron_cropi.rollout.runner import rollout_prompts
    from megatron_cropi.rollout.store import TrajectoryStore

    writer = groups.rank == 0
    opened: list = []  # the store stays on rank 0 (it writes); every rank learns if opening failed

    def open_store():
        header = behaviour_header(path, prompts, sampling=sampling, tokenizer=tokenizer, policy=policy,
                                  engine_kind=engine_kind, reward_cfg=reward_fn.cfg)
        opened.append(TrajectoryStore.open_for_append(path, header))

    on_rank0(open_store)
    store = opened[0] if writer else None
    return rollout_prompts(prompts, engine, sampling, store=store, reward_fn=reward_fn if writer else None,
                           tokenizer=tokenizer, batch_prompts=batch_prompts, policy_version=0, groups=groups,
                           progress=progress and writer, desc=f"rollout {name}")


def _stage_seed(tag: str, seed: int, m: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{tag}:{seed}:{m}".encode(), digest_size=4).digest(), "little") >> 1


def online_sampling(base: SamplingParams, n: int, m: int) -> SamplingParams:
    """The stage-``m`` pool rollouts of ``online_learnability``: GRPO's sampling ``base`` (its temperature
    and length, not β's) with ``n`` responses and a seed of its own per stage, ``hash(base.seed, m)``."""
    return dataclasses.replace(base, n=n, seed=_stage_seed("online", base.seed, m))


def online_pool_subset(pool: Sequence[PromptRecord], fraction: float, *, seed: int, m: int) -> list[PromptRecord]:
    """The pool prompts rolled out at stage ``m``: all of them (``fraction`` 1), else a random
    ``max(1, round(fraction × |pool|))`` of them drawn from ``(seed, m)``; in prompt-id order."""
    ordered = sorted(pool, key=lambda p: p.prompt_id)
    if fraction >= 1.0:
        return ordered
    size = max(1, int(round(fraction * len(ordered))))
    rows = np.random.default_rng(_stage_seed("online-pool", seed, m)).choice(len(ordered), size=size, replace=False)
    return [ordered[i] for i in sorted(rows)]


def online_pool_rollouts(m: int, prompts: Sequence[PromptRecord], path: Path, *, samples: int, base: SamplingParams,
                         rollout, engine, reward_fn, tokenizer, groups, policy: str):
    """Stage ``m``'s pool rollouts of ``online_learnability`` into the store ``path`` (:func:`behaviour_rollouts`):
    ``samples`` responses per prompt of ``prompts`` (:func:`online_pool_subset`) at :func:`online_sampling`
    of GRPO's ``base``, batched as the ``rollout`` section says; ``policy``: θ_m's identity."""
    return behaviour_rollouts(f"stage{m}-pool", prompts, path, sampling=online_sampling(base, samples, m),
                              engine=engine, reward_fn=reward_fn, tokenizer=tokenizer, groups=groups,
                              batch_prompts=rollout.batch_prompts, engine_kind=rollout.engine,
                              progress=rollout.progress, policy=policy)


def rollouts_line(label: str, prompts: Sequence[PromptRecord], summary) -> str:
    """The log line of one behaviour set rolled out (``summary``: :func:`behaviour_rollouts`'s)."""
    return rollouts_line_of(label, rolled_out_record(prompts, summary, 0.0))


def rolled_out_record(prompts: Sequence[PromptRecord], summary, seconds: float) -> dict:
    """One behaviour set rolled out, as numbers (a background scorer's result carries them)."""
    return {"prompts": len(prompts), "pass_rate": float(summary.pass_rate),
            "zero_variance_groups": int(summary.zero_variance_groups), "seconds": float(seconds)}


def rollouts_line_of(label: str, record: dict) -> str:
    """The log line of one behaviour set rolled out, from its :func:`rolled_out_record`."""
    return (f"[rollouts] {label}: {record['prompts']} prompts, pass rate {record['pass_rate']:.3f}, "
            f"{record['zero_variance_groups']} zero-variance groups")


def online_line(m: int, prompts: Sequence[PromptRecord], samples: int, summary, seconds: float) -> str:
    """The log line of stage ``m``'s online pool rollouts (``summary``: :func:`online_pool_rollouts`'s)."""
    return (f"[online] stage {m}: {len(prompts)} pool prompts × {samples} at θ_{m} "
            f"({summary.prompts_rolled_out} rolled out now), pass rate {summary.pass_rate:.3f}, "
            f"{summary.zero_variance_groups} zero-variance groups, {seconds:.1f} s")


def roll_out_sets(sets: list[tuple[str, list, int]], store_of, *, stage: int, base: SamplingParams, curriculum,
                  rollout, engine, reward_fn, tokenizer, groups, policy: str, on_set,
                  reuse_from: Sequence[Path] = (), log=print) -> None:
    """Roll each of ``sets`` (:func:`behaviour_sets`) out into ``store_of(name)`` with behaviour sampling:
    β's at stage 0, the refresh at θ_``stage`` (its own seed) otherwise. ``on_set(label, prompts, summary,
    seconds)`` after each set rolled out; then the fault point ``rollouts:<set>`` (stage 0) or ``refresh:<set>``.

    Args:
        curriculum: the ``curriculum`` section (behaviour temperature and length).
        rollout: the ``rollout`` section (batching, engine kind, progress bars).
        policy: the rolling policy's identity for the store headers.
        reuse_from: run directories whose matching stores of β stand in for rolling out (stage 0 only;
            :func:`~.reuse.reuse_sources`, :func:`~.reuse.reuse_behaviour_store`); ``log`` reports each.
    """
    from megatron_cropi.curriculum.reuse import reuse_behaviour_store

    for name, prompts, n in sets:
        t0 = time.perf_counter()
        sampling = behaviour_sampling(base, n, temperature=curriculum.behaviour_temperature,
                                      max_tokens=curriculum.behaviour_max_tokens, refresh_stage=stage)
        label = name if stage == 0 else f"stage{stage}-{name}"
        path = store_of(name)
        if stage == 0:  # rank 0 decides (it alone may see the sources), every rank follows
            expected = behaviour_header(path, prompts, sampling=sampling, tokenizer=tokenizer, policy=policy,
                                        engine_kind=rollout.engine, reward_cfg=reward_fn.cfg)
            if on_rank0(lambda: reuse_behaviour_store(name, path, expected, reuse_from, log)) is not None:
                fault_point(f"rollouts:{name}")
                continue
        summary = behaviour_rollouts(label, prompts, path, sampling=sampling, engine=engine,
                                     reward_fn=reward_fn, tokenizer=tokenizer, groups=groups,
                                     batch_prompts=rollout.batch_prompts, policy=policy, engine_kind=rollout.engine,
                                     progress=rollout.progress)
        on_set(label, prompts, summary, time.perf_counter() - t0)
        fault_point(f"rollouts:{name}" if stage == 0 else f"refresh:{name}")
