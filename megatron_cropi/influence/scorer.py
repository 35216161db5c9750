"""Score a pool: projected POPI gradients of every prompt into a feature store, resumably.

Rows of the store follow the trajectory store's prompt-id order. Prompts whose K rewards are all
equal carry no gradient: they are written as exact zeros with status *excluded* and never run
through the model. The remaining ("live") prompts are cut into fixed chunks of
``dp × prompts_per_microbatch × microbatches_per_call``; each data-parallel replica captures its
contiguous slice of a chunk, the k-vectors are gathered to global rank 0, which writes the chunk.
Chunk boundaries depend only on the pool, so a resumed run recomputes exactly the chunks that were not
written and its result equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_cropi.config.loader import require
from megatron_cropi.influence.feature_store import DONE, EXCLUDED, FLAGGED, FeatureStore, hash_strings
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.popi.batch import pack_microbatches, sequence_length_for
from megatron_cropi.popi.capture import PopiCapture, select_layouts
from megatron_cropi.popi.loss import PopiLossConfig
from megatron_cropi.records import RolloutGroup
from megatron_cropi.utils.lead_rank import share_from_rank0

__all__ = ["ScoringConfig", "ScoreStats", "score_pool", "param_set_hash"]


@dataclass(frozen=True, kw_only=True)
class ScoringConfig:
    """How per-prompt gradients are captured."""

    mode: Literal["per_prompt", "batched"] = "batched"
    """Capture mode: one backward per prompt (a) or many prompts per backward (b)."""
    prompts_per_microbatch: int = 8
    """Prompts (× K responses) per micro-batch in batched mode (per_prompt mode uses 1)."""
    microbatches_per_call: int = 4
    """Micro-batches per schedule call; one call's rows are written together (resume granularity)."""
    loss: PopiLossConfig = field(default_factory=PopiLossConfig)
    """Options of the POPI loss."""
    include_params: tuple[str, ...] = ()
    """Regexes on global parameter names to score (empty: all trainable parameters)."""
    exclude_params: tuple[str, ...] = ()
    """Regexes on global parameter names to leave out."""
    seq_length: int | None = None
    """Padded sequence length; default the longest prompt + response of the pool."""
    feature_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the feature stores (read back as float32): float16 scales each row by its max
    |x| (a fp32 scale per row), bfloat16 keeps float32's range; both halve the disk footprint."""

    def __post_init__(self):
        require(1 <= self.prompts_per_microbatch <= 4096, "prompts_per_microbatch", self.prompts_per_microbatch,
                "must be between 1 and 4096")
        require(1 <= self.microbatches_per_call <= 4096, "microbatches_per_call", self.microbatches_per_call,
                "must be between 1 and 4096")
        if self.seq_length is not None:
            require(self.seq_length >= 2, "seq_length", self.seq_length, "must be >= 2 or null")
        require(self.feature_dtype in ("float32", "float16", "bfloat16"), "feature_dtype", self.feature_dtype,
                "must be one of float32, float16, bfloat16")


@dataclass
class ScoreStats:
    """What a scoring call did."""

    rows: int = 0
    scored: int = 0
    excluded: int = 0
    flagged: int = 0
    skipped_done: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_prompt(self) -> float:
        return self.seconds / max(self.scored, 1)


def param_set_hash(model, groups: ParallelGroups, cfg: ScoringConfig) -> str:
    """Hash of the scored parameters' global names and shapes, identical on every rank."""
    layouts = select_layouts(model, groups, include=cfg.include_params, exclude=cfg.exclude_params)
    mine = sorted({f"{l.global_name}:{tuple(l.global_shape)}" for l in layouts.values()})
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return hash_strings(sorted(set().union(*map(set, everyone))))


def score_pool(
    rollouts: Sequence[RolloutGroup],
    store: FeatureStore | None,
    *,
    model,
    groups: ParallelGroups,
    projector,
    cfg: ScoringConfig,
    temperature: float,
    responses_per_prompt: int,
    pad_id: int = 0,
    progress: bool = True,
    max_chunks: int | None = None,
    on_chunk=None,
) -> ScoreStats:
    """Fill ``store`` (opened on global rank 0, None elsewhere) with the pool's projected gradients.

    Args:
        rollouts: the pool's rollout groups in store-row order (every rank passes the same list).
        temperature: T of the behaviour log-probs (the store's sampling temperature, or 1 for raw).
        responses_per_prompt: K (the store's ``n``).
        max_chunks: stop after this many chunks (tests of resume).
        on_chunk: called after each written chunk (fault injection in tests).

    Returns:
        :class:`ScoreStats` (meaningful on every rank).
    """
    t0 = time.perf_counter()
    rank0 = dist.get_rank() == 0
    n = len(rollouts)
    status = share_from_rank0(store.statuses().copy() if rank0 else None)
    stats = ScoreStats(rows=n)
    zero_var = np.array([g.zero_variance for g in rollouts], dtype=bool)
    newly_excluded = np.flatnonzero(zero_var & (status == 0))
    if rank0 and newly_excluded.size:
        store.write_rows(newly_excluded, np.zeros((newly_excluded.size, projector.k), np.float32),
                         np.full(newly_excluded.size, EXCLUDED, np.uint8))
    stats.excluded = int(zero_var.sum())

    live = np.flatnonzero(~zero_var)
    per_replica = cfg.prompts_per_microbatch * cfg.microbatches_per_call
    ppm = 1 if cfg.mode == "per_prompt" else cfg.prompts_per_microbatch
    chunk = groups.dp_size * per_replica
    seq = cfg.seq_length or sequence_length_for(rollouts)
    capture = PopiCapture(model, groups, projector, mode=cfg.mode, loss_cfg=cfg.loss, temperature=temperature,
                          layouts=select_layouts(model, groups, include=cfg.include_params,
                                                 exclude=cfg.exclude_params))
    bar = None
    if progress and rank0:
        from tqdm import tqdm

        bar = tqdm(total=live.size, desc="scoring", unit="prompt", initial=int((status[live] != 0).sum()))
    done_chunks = 0
    for start in range(0, live.size, chunk):
        rows = live[start:start + chunk]
        if not (status[rows] == 0).any():
            stats.skipped_done += rows.size
            continue
        if max_chunks is not None and done_chunks >= max_chunks:
            break
        mine = rows[groups.dp_rank * per_replica:(groups.dp_rank + 1) * per_replica]
        payload = None
        if mine.size:
            mbs = pack_microbatches([rollouts[i] for i in mine], list(range(mine.size)), prompts_per_microbatch=ppm,
                                    responses_per_prompt=responses_per_prompt, seq_length=seq, pad_id=pad_id)
            out = capture.run(mbs, mine.size, responses_per_prompt)
            if groups.tp_rank == 0 and groups.pp_rank == 0:
                payload = (mine, out.sketches.numpy(), out.finite.numpy())
        gathered = [None] * dist.get_world_size() if rank0 else None
        dist.gather_object(payload, gathered, dst=0)
        if rank0:
            for item in gathered:
                if item is None:
                    continue
                r, sk, fin = item
                store.write_rows(r, sk, np.where(fin, DONE, FLAGGED).astype(np.uint8))
                stats.flagged += int((~fin).sum())
            if bar is not None:
                bar.update(rows.size)
        stats.scored += rows.size
        done_chunks += 1
        if on_chunk is not None:
            on_chunk()
    if bar is not None:
        bar.close()
    flagged = torch.tensor([stats.flagged])
    dist.broadcast(flagged, src=0)
    stats.flagged = int(flagged.item())
    stats.seconds = time.perf_counter() - t0
    return stats
