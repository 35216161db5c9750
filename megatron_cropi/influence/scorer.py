"""Score a pool: projected POPI gradients of every prompt into a feature store, resumably.

Rows of the store follow the trajectory store's prompt-id order. Prompts whose K rewards are all
equal carry no gradient: they are written as exact zeros with status *excluded* and never run
through the model. The remaining ("live") prompts are cut into fixed chunks of
``dp × prompts_per_microbatch × microbatches_per_call``; each data-parallel replica captures its
contiguous slice of a chunk, the k-vectors are gathered to global rank 0, which writes the chunk.
Chunk boundaries depend only on the pool, so a resumed run recomputes exactly the chunks that were not
written and its result equals an uninterrupted run's bit for bit.

Two options make scoring cheaper with the same features (to float error):

* ``max_tokens_per_microbatch > 0``: length-aware micro-batches (:mod:`megatron_cropi.popi.buckets`).
  Live prompts are sorted by length and cut into schedule calls; a call's micro-batches are padded to
  its longest sequence (rounded up to ``length_multiple``) and hold as many prompts as fit the token
  budget. A chunk is then ``dp`` consecutive calls, one per replica.
* ``truncate_backward``: the backward stops below the lowest scored module
  (:mod:`megatron_cropi.popi.truncate`); with ``last_layers: L`` only the last ``L`` decoder layers, the
  final norm and the output layer are scored (:func:`scored_layouts`).
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
from megatron_cropi.influence.shortlist import ShortlistConfig
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.model.params import ParamLayout
from megatron_cropi.model.schedule import as_chunks
from megatron_cropi.popi.batch import pack_microbatches, sequence_length_for
from megatron_cropi.popi.buckets import (
    ScheduleCall,
    group_lengths,
    group_token_counts,
    length_bucketed_calls,
    padded_tokens,
    uniform_calls,
    without_padding_rows,
)
from megatron_cropi.popi.capture import PopiCapture, select_layouts
from megatron_cropi.popi.loss import PopiLossConfig
from megatron_cropi.records import RolloutGroup
from megatron_cropi.utils.rank_zero import share_from_rank0

__all__ = ["ScoringConfig", "ScoreStats", "score_pool", "param_set_hash", "scored_layouts", "last_layers_patterns",
           "plan_calls", "trims_padding_rows", "make_capture", "capture_call"]


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
    """Padded sequence length; default the longest prompt + response of the pool. With a token budget:
    the longest padded length (the cap)."""
    max_tokens_per_microbatch: int = 0
    """Token budget per micro-batch (rows × padded length); 0 = off: every micro-batch holds
    ``prompts_per_microbatch`` prompts padded to ``seq_length``. On: prompts sorted by length, each
    schedule call's micro-batches padded to the call's longest sequence (rounded up to
    ``length_multiple``) and holding ``clamp(budget // (K × length), 1, prompts_per_microbatch)``
    prompts (``popi/buckets.py``). A budget of ``prompts_per_microbatch × K × seq_length`` keeps the
    longest micro-batch's memory."""
    length_multiple: int = 8
    """With a token budget: padded lengths are multiples of this (fewer distinct shapes)."""
    truncate_backward: bool = False
    """Stop the backward below the lowest scored module (the same features; cheaper when only upper
    layers are scored, e.g. with ``last_layers``)."""
    last_layers: int = 0
    """Score only the last L decoder layers, the final norm and the output layer (0 = off). With tied
    embeddings the output layer is the input embedding and is not included. Exclusive with
    ``include_params``."""
    max_responses_per_prompt: int = 0
    """Score each prompt on at most this many of its stored responses (the first ones; 0 = all): fewer
    responses than were rolled out make scoring cheaper, and the group advantages are those of the
    subset (a prompt whose subset has all-equal rewards is excluded)."""
    logprob_chunk_tokens: int = 1024
    """Token positions per fp32 chunk of the vocab-parallel log-softmax (``model/logprobs.py``): the
    work tensors are ``[chunk, V/TP]`` instead of ``[rows × seq, V/TP]``; 0 = the whole micro-batch at
    once (the same values, several times the logit memory)."""
    shortlist: ShortlistConfig = field(default_factory=ShortlistConfig)
    """Score only a shortlist of the pool at stages after the first (``influence/shortlist.py``); off by
    default."""
    scale_out: bool = False
    """Score the pool with :mod:`megatron_cropi.influence.scale_out`: each data-parallel replica reads only
    the rollouts of the units it takes from a shared queue and writes its own shard of a sharded feature
    store; selection gathers per-row cosines, never k-vectors. The same features and selections as off.
    Not with ``shortlist`` or ``selection.guard.source: pool``."""
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
        require(self.logprob_chunk_tokens >= 0, "logprob_chunk_tokens", self.logprob_chunk_tokens,
                "must be >= 0 (0 = the whole micro-batch at once)")
        require(self.max_tokens_per_microbatch >= 0, "max_tokens_per_microbatch", self.max_tokens_per_microbatch,
                "must be >= 0 (0 = off)")
        require(1 <= self.length_multiple <= 4096, "length_multiple", self.length_multiple,
                "must be between 1 and 4096")
        require(self.max_responses_per_prompt == 0 or self.max_responses_per_prompt >= 2, "max_responses_per_prompt",
                self.max_responses_per_prompt, "must be 0 (all) or >= 2 (a group of one has no advantage)")
        require(self.last_layers >= 0, "last_layers", self.last_layers, "must be >= 0 (0 = all layers)")
        require(not (self.last_layers and self.include_params), "last_layers", self.last_layers,
                "cannot be combined with include_params (set one of them)")


@dataclass
class ScoreStats:
    """What a scoring call did."""

    rows: int = 0
    scored: int = 0
    excluded: int = 0
    flagged: int = 0
    skipped_done: int = 0
    shortlisted_out: int = 0
    """Live rows left unscored by the shortlist (written as excluded: they cannot be selected)."""
    seconds: float = 0.0
    tokens: int = 0
    """Real tokens (prompt + response of every sequence) of the scored chunks, all replicas."""
    padded_tokens: int = 0
    """Token positions computed for them: rows × padded length of every micro-batch (its padding rows too)."""

    @property
    def seconds_per_prompt(self) -> float:
        return self.seconds / max(self.scored, 1)

    @property
    def padding_fraction(self) -> float:
        """``1 − tokens / padded_tokens``: the share of computed positions that were padding."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


def last_layers_patterns(num_layers: int, last: int) -> tuple[str, ...]:
    """Regexes on global names of the last ``last`` of ``num_layers`` decoder layers, the final norm and
    the (untied) output layer."""
    require(1 <= last <= num_layers, "scoring.last_layers", last, f"must be between 1 and the model's {num_layers} "
            "decoder layers")
    idx = "|".join(str(i) for i in range(num_layers - last, num_layers))
    return (rf"^decoder\.layers\.({idx})\.", r"^decoder\.final_layernorm\.", r"^output_layer\.")


def scored_layouts(model, groups: ParallelGroups, cfg: ScoringConfig
                   ) -> dict[str, ParamLayout] | list[dict[str, ParamLayout]]:
    """This rank's scored parameters: ``include_params`` (or the ``last_layers`` patterns) minus
    ``exclude_params``, matched on global names (:func:`~megatron_cropi.popi.capture.select_layouts`;
    one dict per chunk when ``model`` is the interleaved schedule's list of chunks)."""
    include = cfg.include_params
    if cfg.last_layers:
        include = last_layers_patterns(int(as_chunks(model)[0].config.num_layers), cfg.last_layers)
    return select_layouts(model, groups, include=include, exclude=cfg.exclude_params)


def param_set_hash(model, groups: ParallelGroups, cfg: ScoringConfig) -> str:
    """Hash of the scored parameters' global names and shapes, identical on every rank (and under every
    layout: a set of global names, so the interleaved schedule's chunks hash as the 1F1B stages do)."""
    layouts = scored_layouts(model, groups, cfg)
    per_chunk = layouts if isinstance(layouts, list) else [layouts]
    mine = sorted({f"{l.global_name}:{tuple(l.global_shape)}" for chunk in per_chunk for l in chunk.values()})
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return hash_strings(sorted(set().union(*map(set, everyone))))


def plan_calls(live_lengths: np.ndarray, cfg: ScoringConfig, *, responses_per_prompt: int, seq_length: int
               ) -> list[ScheduleCall]:
    """The schedule calls of the live prompts (positions into them), from their lengths alone: uniform
    calls, or length-aware ones with a token budget (:mod:`megatron_cropi.popi.buckets`). Independent of
    the number of replicas, so every layout scores the same calls."""
    ppm = 1 if cfg.mode == "per_prompt" else cfg.prompts_per_microbatch
    if cfg.max_tokens_per_microbatch:
        return length_bucketed_calls(live_lengths, responses_per_prompt=responses_per_prompt,
                                     max_tokens=cfg.max_tokens_per_microbatch, max_prompts=ppm,
                                     microbatches_per_call=cfg.microbatches_per_call,
                                     multiple=cfg.length_multiple, cap=seq_length)
    return uniform_calls(len(live_lengths), prompts_per_call=cfg.prompts_per_microbatch * cfg.microbatches_per_call,
                         seq_length=seq_length, prompts_per_microbatch=ppm)


def trims_padding_rows(cfg: ScoringConfig, groups: ParallelGroups) -> bool:
    """Whether a call's empty padding rows are dropped: with a token budget at PP = 1 (PP exchanges one
    activation shape per call)."""
    return bool(cfg.max_tokens_per_microbatch) and groups.pp_size == 1


def make_capture(model, groups: ParallelGroups, projector, cfg: ScoringConfig, temperature: float) -> PopiCapture:
    """The batched or per-prompt POPI capture of ``cfg`` on this rank's model stage (or its list of
    chunks under the interleaved schedule)."""
    return PopiCapture(model, groups, projector, mode=cfg.mode, loss_cfg=cfg.loss, temperature=temperature,
                       layouts=scored_layouts(model, groups, cfg), truncate_backward=cfg.truncate_backward,
                       logprob_chunk_tokens=cfg.logprob_chunk_tokens)


def capture_call(capture: PopiCapture, call_groups: Sequence[RolloutGroup], call: ScheduleCall, *,
                 responses_per_prompt: int, pad_id: int, trim_rows: bool):
    """Projected gradients of one schedule call's groups (in call order): a
    :class:`~megatron_cropi.popi.capture.CaptureOutput` with ``sketches [n, k]`` and ``finite [n]`` (CPU)."""
    mbs = pack_microbatches(list(call_groups), list(range(len(call_groups))),
                            prompts_per_microbatch=call.prompts_per_microbatch,
                            responses_per_prompt=responses_per_prompt, seq_length=call.seq_length, pad_id=pad_id)
    if trim_rows:
        mbs = [without_padding_rows(mb, responses_per_prompt) for mb in mbs]
    return capture.run(mbs, len(call_groups), responses_per_prompt)


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
    skip: np.ndarray | None = None,
) -> ScoreStats:
    """Fill ``store`` (opened on global rank 0, None elsewhere) with the pool's projected gradients.

    Args:
        rollouts: the pool's rollout groups in store-row order (every rank passes the same list).
        temperature: T of the behaviour log-probs (the store's sampling temperature, or 1 for raw).
        responses_per_prompt: K (the store's ``n``).
        max_chunks: stop after this many chunks (tests of resume).
        on_chunk: called after each written chunk (fault injection in tests).
        skip: ``[n]`` bool, rows not to score (the shortlist's complement): written as excluded, like
            zero-variance rows, and counted as ``shortlisted_out``.

    Returns:
        :class:`ScoreStats` (meaningful on every rank).
    """
    t0 = time.perf_counter()
    rank0 = dist.get_rank() == 0
    n = len(rollouts)
    status = share_from_rank0(store.statuses().copy() if rank0 else None)
    stats = ScoreStats(rows=n)
    zero_var = np.array([g.zero_variance for g in rollouts], dtype=bool)
    skip = np.zeros(n, dtype=bool) if skip is None else np.asarray(skip, dtype=bool)
    stats.shortlisted_out = int((skip & ~zero_var).sum())
    zero_var = zero_var | skip
    newly_excluded = np.flatnonzero(zero_var & (status == 0))
    if rank0 and newly_excluded.size:
        store.write_rows(newly_excluded, np.zeros((newly_excluded.size, projector.k), np.float32),
                         np.full(newly_excluded.size, EXCLUDED, np.uint8))
    stats.excluded = int(zero_var.sum()) - stats.shortlisted_out

    live = np.flatnonzero(~zero_var)
    live_groups = [rollouts[i] for i in live]
    calls = plan_calls(group_lengths(live_groups), cfg, responses_per_prompt=responses_per_prompt,
                       seq_length=cfg.seq_length or sequence_length_for(rollouts))
    real_tokens = group_token_counts(live_groups)
    trim_rows = trims_padding_rows(cfg, groups)
    capture = make_capture(model, groups, projector, cfg, temperature)
    bar = None
    if progress and rank0:
        from tqdm import tqdm

        bar = tqdm(total=live.size, desc="scoring", unit="prompt", initial=int((status[live] != 0).sum()))
    done_chunks = 0
    for start in range(0, len(calls), groups.dp_size):  # a chunk: one call per data-parallel replica
        step = calls[start:start + groups.dp_size]
        rows = live[np.concatenate([c.indices for c in step])]
        if not (status[rows] == 0).any():
            stats.skipped_done += rows.size
            continue
        if max_chunks is not None and done_chunks >= max_chunks:
            break
        call = step[groups.dp_rank] if groups.dp_rank < len(step) else None
        mine = live[call.indices] if call is not None else live[:0]
        payload = None
        if mine.size:
            out = capture_call(capture, [rollouts[i] for i in mine], call, responses_per_prompt=responses_per_prompt,
                               pad_id=pad_id, trim_rows=trim_rows)
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
        stats.tokens += int(sum(real_tokens[c.indices].sum() for c in step))
        stats.padded_tokens += sum(padded_tokens(c, responses_per_prompt, padding_rows=not trim_rows) for c in step)
        done_chunks += 1
        if on_chunk is not None:
            on_chunk()
    if bar is not None:
        bar.close()
    flagged = torch.tensor([stats.flagged], device=groups.device)  # NCCL broadcasts CUDA tensors only
    dist.broadcast(flagged, src=0)
    stats.flagged = int(flagged.item())
    stats.seconds = time.perf_counter() - t0
    return stats
