"""The bodies of the controller's steps. Each gets its inputs as values and returns its outputs.

Files they read and write are named by the run's :class:`~megatron_cropi.layout.RunLayout`; the
controller decides which steps still have to run (``state.json``), charges their time to the run
clock and marks them done. Nothing here knows about the controller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_cropi.influence.feature_store import DONE, FeatureStore
from megatron_cropi.influence.stores import read_complete_store
from megatron_cropi.layout import RunLayout
from megatron_cropi.records import PromptRecord, SamplingParams
from megatron_cropi.selection.policies import Selection, SelectionConfig, SelectionInputs, select
from megatron_cropi.utils.atomic import atomic_write_json
from megatron_cropi.utils.rank_zero import on_rank0

__all__ = ["behaviour_sampling", "behaviour_rollouts", "online_sampling", "online_pool_subset", "refresh_stage_of",
           "feature_set_names",
           "read_selection", "selected_prompts", "previous_selections", "selection_inputs", "select_stage"]


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
    from megatron_cropi.data.prompt_ids import pool_hash
    from megatron_cropi.rollout.runner import rollout_prompts
    from megatron_cropi.rollout.store import StoreHeader, TrajectoryStore

    writer = groups.rank == 0
    opened: list = []  # the store stays on rank 0 (it writes); every rank learns if opening failed

    def open_store():
        header = StoreHeader.build(sampling, tokenizer=tokenizer.identity, model=policy, policy_version=0,
                                   num_prompts=len(prompts), engine=engine_kind,
                                   pool_hash=pool_hash(p.prompt_id for p in prompts), extra={"set": path.name})
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


def feature_set_names(target_families: Sequence[str], *, guard: bool = False) -> list[str]:
    """The sets scored at every stage: ``pool``, ``target-<family>`` for each target set, and ``guard``
    (the check set, when ``selection.guard.source`` is ``check``)."""
    return ["pool"] + [f"target-{t}" for t in sorted(target_families)] + (["guard"] if guard else [])


def read_selection(path: Path) -> Selection | None:
    """The selection written at ``path``, or None when there is none yet."""
    return Selection.from_dict(json.loads(path.read_text())) if path.exists() else None


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
    features = fs.matrix()
    return features, (fs.statuses() == DONE) & (np.abs(features).sum(1) > 0)


def selection_inputs(pool: Sequence[PromptRecord], *, pool_rollouts: Path | None, features: dict[str, Path],
                     previous: set[str]) -> SelectionInputs:
    """What a selection policy reads: the pool's ids, sources and pass rates (from the trajectory store
    ``pool_rollouts``, when there is one: β's, or θ_m's for ``online_learnability``), and the pool's and
    target sets' features when ``features`` names them.

    Rows follow the store (the feature stores' row order); pool prompts the store does not hold (a
    partial online roll-out) follow in prompt-id order with pass rate NaN."""
    if pool_rollouts is not None and pool_rollouts.exists():
        pool_groups, _ = read_complete_store(pool_rollouts)
        held = {g.prompt_id for g in pool_groups}
        rest = sorted((p for p in pool if p.prompt_id not in held), key=lambda p: p.prompt_id)
        inputs = SelectionInputs(prompt_ids=[g.prompt_id for g in pool_groups] + [p.prompt_id for p in rest],
                                 pass_rates=np.array([g.pass_rate for g in pool_groups] + [np.nan] * len(rest)),
                                 sources=[g.prompt.source for g in pool_groups] + [p.source for p in rest],
                                 previous=previous)
    else:  # full / random need no rollouts
        ordered = sorted(pool, key=lambda p: p.prompt_id)
        inputs = SelectionInputs(prompt_ids=[p.prompt_id for p in ordered], pass_rates=np.full(len(ordered), np.nan),
                                 sources=[p.source for p in ordered], previous=previous)
    if features:
        inputs.features, inputs.usable = _usable(FeatureStore.load(features["pool"]))
        for name, path in features.items():
            if name.startswith("target-"):
                inputs.targets[name[len("target-"):]] = _usable(FeatureStore.load(path))
            elif name == "guard":
                inputs.guard = _usable(FeatureStore.load(path))
    return inputs


def select_stage(m: int, *, layout: RunLayout, pool: Sequence[PromptRecord], cfg: SelectionConfig, seed: int,
                 features: dict[str, Path], pool_rollouts: Path | None) -> Selection:
    """Choose stage ``m``'s prompts on global rank 0, write ``selections/stage{m}.json``, and return the
    selection on every rank (rank 0's error, if any, is raised on every rank).

    ``pool_rollouts``: the trajectory store the pass rates come from (β's pool store, the stage's
    θ_m store for ``online_learnability``, or None)."""

    def choose() -> Selection:
        t0 = time.perf_counter()
        inputs = selection_inputs(pool, pool_rollouts=pool_rollouts, features=features,
                                  previous=previous_selections(layout, m))
        result = select(cfg, inputs, stage=m, seed=seed)
        result.summary["seconds"] = time.perf_counter() - t0
        atomic_write_json(layout.selection(m), result.to_dict())
        return result

    return on_rank0(choose)
