"""Schedule calls for scoring: which prompts go together, at which padded length.

A :class:`ScheduleCall` is one call into Megatron's schedule: ``n`` prompts (positions into the
caller's list), packed by :func:`~megatron_cropi.popi.batch.pack_microbatches` into ``⌈n / P⌉``
micro-batches of ``P`` prompts × ``K`` responses, every sequence right-padded to ``L``. Under pipeline
parallelism the stages exchange activations of one shape ``[L, P·K, hidden]`` per call, so ``L`` and
``P`` are fixed within a call (the last micro-batch is completed with padding rows).

Two plans:

* :func:`uniform_calls` (today's behaviour, ``scoring.max_tokens_per_microbatch: 0``): consecutive
  prompts, ``P = prompts_per_microbatch``, ``L`` = one length for the whole pool (its longest
  prompt + response, or ``scoring.seq_length``).
* :func:`length_bucketed_calls` (a token budget ``B > 0``): prompt ``i`` gets the padded length
  ``L_i = min(⌈ℓ_i / m⌉ · m, S_cap)`` where ``ℓ_i`` is its longest prompt + response and ``m`` the
  rounding multiple (fewer distinct shapes); prompts are sorted by ``(L_i, i)`` and cut, in that order,
  into calls: a call at length ``L`` (its last, longest prompt's) holds micro-batches of
  ``P(L) = clamp(⌊B / (K·L)⌋, 1, P_max)`` prompts, at most ``C`` of them, and takes the next prompt
  ``j`` while its count stays ``≤ C · P(L_j)``. A micro-batch thus holds ``P·K·L ≤ max(B, K·L)``
  padded tokens; ``P_max`` bounds the batched capture's per-prompt gradient tensors ``[P, out, in]``.
  Only a call's last micro-batch can be partly empty; under PP = 1 its padding rows are dropped
  (:func:`without_padding_rows`: the schedule exchanges no activations, shapes may differ).

Both are pure functions of the prompt lengths and the configuration, so chunk boundaries (resume
granularity) do not depend on what was already scored. Features are written back by row id, so the
sorting never changes the store's row order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megatron_cropi.popi.batch import PopiMicrobatch
from megatron_cropi.records import RolloutGroup

__all__ = ["ScheduleCall", "group_lengths", "group_token_counts", "uniform_calls", "length_bucketed_calls",
           "padded_tokens", "without_padding_rows"]


@dataclass(frozen=True)
class ScheduleCall:
    """One schedule call: ``indices`` ``[n]`` (positions into the caller's prompt list, in packing
    order), every micro-batch ``prompts_per_microbatch`` prompts padded to ``seq_length``."""

    indices: np.ndarray
    seq_length: int
    prompts_per_microbatch: int

    @property
    def num_microbatches(self) -> int:
        return -(-len(self.indices) // self.prompts_per_microbatch)


def group_lengths(groups: Sequence[RolloutGroup]) -> np.ndarray:
    """``[n]`` int64: each group's longest prompt + response (``0`` for a group without responses)."""
    return np.array([len(g.prompt.token_ids) + max((len(r.token_ids) for r in g.responses), default=0)
                     for g in groups], dtype=np.int64)


def group_token_counts(groups: Sequence[RolloutGroup]) -> np.ndarray:
    """``[n]`` int64: each group's real tokens, ``Σ_k (prompt + response_k)``."""
    return np.array([sum(len(g.prompt.token_ids) + len(r.token_ids) for r in g.responses) for g in groups],
                    dtype=np.int64)


def uniform_calls(n: int, *, prompts_per_call: int, seq_length: int, prompts_per_microbatch: int
                  ) -> list[ScheduleCall]:
    """Consecutive slices of ``prompts_per_call`` of ``n`` prompts, all at ``seq_length``."""
    return [ScheduleCall(np.arange(s, min(s + prompts_per_call, n)), seq_length, prompts_per_microbatch)
            for s in range(0, n, prompts_per_call)]


def length_bucketed_calls(lengths: np.ndarray, *, responses_per_prompt: int, max_tokens: int, max_prompts: int,
                          microbatches_per_call: int, multiple: int, cap: int) -> list[ScheduleCall]:
    """Length-aware calls (see the module docstring).

    Args:
        lengths: ``[n]`` longest prompt + response of each prompt (:func:`group_lengths`).
        max_tokens: ``B``, padded tokens per micro-batch (a micro-batch holds at least one prompt).
        max_prompts: ``P_max``.
        microbatches_per_call: ``C``.
        multiple: ``m``, padded lengths are multiples of it (except the cap).
        cap: ``S_cap``, the longest padded length (a prompt longer than it is refused when packed).

    Returns:
        Calls in ascending padded length; each prompt index appears exactly once.
    """
    if max_tokens < 1 or max_prompts < 1 or microbatches_per_call < 1 or multiple < 1 or cap < 1:
        raise ValueError("max_tokens, max_prompts, microbatches_per_call, multiple and cap must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = np.minimum(-(-np.maximum(lengths, 1) // multiple) * multiple, cap)
    order = np.lexsort((np.arange(lengths.size), padded))  # by padded length, then by index
    sorted_len = padded[order].tolist()

    def per_mb(seq: int) -> int:
        return int(min(max(max_tokens // (responses_per_prompt * seq), 1), max_prompts))

    calls, start, n = [], 0, lengths.size
    while start < n:
        end = start + 1
        while end < n and end - start + 1 <= microbatches_per_call * per_mb(sorted_len[end]):
            end += 1
        seq = sorted_len[end - 1]
        calls.append(ScheduleCall(order[start:end], seq, per_mb(seq)))
        start = end
    return calls


def padded_tokens(call: ScheduleCall, responses_per_prompt: int, *, padding_rows: bool = True) -> int:
    """Token positions the call computes: rows × ``L``; rows are ``micro-batches × P·K`` with padding
    rows, ``n·K`` without (:func:`without_padding_rows`)."""
    prompts = call.num_microbatches * call.prompts_per_microbatch if padding_rows else len(call.indices)
    return prompts * responses_per_prompt * call.seq_length


def without_padding_rows(mb: PopiMicrobatch, responses_per_prompt: int) -> PopiMicrobatch:
    """``mb`` cut to its groups' ``num_groups × K`` rows (a last micro-batch's empty groups dropped)."""
    n = mb.num_groups * responses_per_prompt
    cut = {name: (v[:n] if name in ("tokens", "position_ids", "labels", "mask", "behaviour_logprobs", "rewards",
                                    "group_index") else v) for name, v in mb.__dict__.items()}
    return PopiMicrobatch(**cut)
