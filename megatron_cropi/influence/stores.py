"""Score a trajectory store into a feature store: the one place that joins the two.

:func:`score_store` is what the stage controller, the projection probe and ``cropi score`` call. It
owns everything that must agree between them: the feature store's header (rows, k, projector,
scored-parameter set, checkpoint step, prompt ids, storage dtype), the behaviour temperature of the
stored log-probs, and the pad id.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch.distributed as dist

from megatron_cropi.influence.feature_store import FeatureHeader, FeatureStore, hash_strings
from megatron_cropi.influence.scorer import ScoreStats, ScoringConfig, param_set_hash, score_pool
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.records import RolloutGroup, SamplingParams
from megatron_cropi.rollout.store import TrajectoryStore
from megatron_cropi.utils.rank_zero import on_rank0

__all__ = ["FeatureSink", "MemoryFeatureSink", "PolicyScorer", "open_complete_store", "read_complete_store",
           "score_store"]


class FeatureSink(Protocol):
    """Where :func:`~megatron_cropi.influence.scorer.score_pool` writes rows (a feature store, or memory)."""

    def statuses(self) -> np.ndarray: ...

    def write_rows(self, rows, features, status) -> None: ...


class MemoryFeatureSink:
    """An in-memory ``[n, k]`` float32 sink with the feature store's write API (the probe's exact features)."""

    def __init__(self, n: int, k: int):
        self.features = np.zeros((n, k), np.float32)
        self.status = np.zeros(n, np.uint8)

    def statuses(self) -> np.ndarray:
        return self.status

    def write_rows(self, rows, features, status) -> None:
        self.features[np.asarray(rows)] = features
        self.status[np.asarray(rows)] = status


class PolicyScorer:
    """The policy at one checkpoint and how to score with it: model, groups, projector, scoring config.

    Args:
        model: this rank's policy stage (Megatron ``GPTModel``, possibly DDP-wrapped), or under the
            interleaved schedule the list of its V chunks (``build_model_chunks``).
        projector: a :class:`~megatron_cropi.projection.base.Projector` (identical on every rank).
        cfg: the ``scoring`` section.
        projection_seed: ``projection.seed`` (recorded in the header).
        checkpoint_step: the GRPO step of the policy (recorded in the header).
        pad_id: the tokenizer's pad id.
    """

    def __init__(self, model, groups: ParallelGroups, projector, cfg: ScoringConfig, *, projection_seed: int,
                 checkpoint_step: int, pad_id: int, progress: bool = False):
        self.model, self.groups, self.projector, self.cfg = model, groups, projector, cfg
        self.projection_seed, self.checkpoint_step, self.pad_id = projection_seed, checkpoint_step, pad_id
        self.progress = progress
        self.param_set_hash = param_set_hash(model, groups, cfg)

    def header(self, rollouts: Sequence[RolloutGroup]) -> FeatureHeader:
        """The feature-store header of scoring ``rollouts`` (in store-row order) with this policy."""
        return self.header_for([g.prompt_id for g in rollouts])

    def header_for(self, prompt_ids: Sequence[str]) -> FeatureHeader:
        """The feature-store header of scoring the rows ``prompt_ids`` (store-row order) with this policy."""
        return FeatureHeader(num_rows=len(prompt_ids), k=self.projector.k, seed=self.projection_seed,
                             projector=json.dumps(self.projector.describe(), sort_keys=True, default=str),
                             param_set_hash=self.param_set_hash, checkpoint_step=self.checkpoint_step,
                             prompt_id_hash=hash_strings(prompt_ids),
                             dtype=self.cfg.feature_dtype, responses_per_prompt=self.cfg.max_responses_per_prompt)


def open_complete_store(path: Path) -> TrajectoryStore:
    """The trajectory store at ``path``, every part verified.

    Raises:
        RuntimeError: the store is not complete (its rollouts were interrupted).
    """
    store = TrajectoryStore.open(path)
    if not store.complete:
        raise RuntimeError(f"{store.path} is not complete; rerun to finish its rollouts")
    return store


def read_complete_store(path: Path) -> tuple[list[RolloutGroup], SamplingParams]:
    """Every rollout group of the trajectory store at ``path`` in prompt-id order, and its sampling params.

    Every rank reads the store itself (``run.output_dir`` must be on a filesystem all ranks see).

    Raises:
        RuntimeError: the store is not complete (its rollouts were interrupted).
    """
    store = open_complete_store(path)
    return list(store.iter_groups()), store.header.sampling_params


def score_store(rollouts_dir: Path, out: Path | FeatureSink, scorer: PolicyScorer, *,
                rows: Sequence[int] | None = None, projector=None, on_chunk=None,
                shortlist: Callable[[list[RolloutGroup]], np.ndarray] | None = None) -> ScoreStats:
    """Projected POPI gradients of the trajectory store ``rollouts_dir`` into ``out``.

    Args:
        out: a feature-store directory (created, or resumed when its header matches; written by global
            rank 0), or a :class:`FeatureSink` (rank 0's; the other ranks may pass any sink or None).
        rows: score only these store rows, in this order (the probe); default all.
        projector: overrides ``scorer.projector`` (the probe's exact projector).
        on_chunk: called after each written chunk (fault injection in tests).
        shortlist: given the groups as scored (after ``max_responses_per_prompt``), the ``[n]`` bool mask
            of rows to score (:func:`~megatron_cropi.influence.shortlist.shortlist_mask`); the others are
            written as excluded. Default: every row.

    Returns:
        :class:`~megatron_cropi.influence.scorer.ScoreStats`, the same on every rank.
    """
    groups_list, sampling = read_complete_store(rollouts_dir)
    if rows is not None:
        groups_list = [groups_list[i] for i in rows]
    k = sampling.n
    cap = scorer.cfg.max_responses_per_prompt
    if cap and cap < k:  # the first ``cap`` responses of each group (samples are i.i.d. by index)
        groups_list = [dataclasses.replace(g, responses=g.responses[:cap], rewards=g.rewards[:cap])
                       for g in groups_list]
        k = cap
    rank0 = dist.get_rank() == 0
    if isinstance(out, (str, Path)):
        opened: list[FeatureStore] = []  # memory maps stay on rank 0; only success or the error is shared
        on_rank0(lambda: opened.append(FeatureStore.open(Path(out), scorer.header(groups_list))))
        sink = opened[0] if rank0 else None
    else:
        sink = out if rank0 else None
    skip = None if shortlist is None else ~np.asarray(shortlist(groups_list), dtype=bool)
    return score_pool(groups_list, sink, model=scorer.model, groups=scorer.groups,
                      projector=projector or scorer.projector, cfg=scorer.cfg,
                      temperature=sampling.logprob_temperature, responses_per_prompt=k,
                      pad_id=scorer.pad_id, progress=scorer.progress, on_chunk=on_chunk, skip=skip)
