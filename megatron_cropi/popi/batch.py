"""Pack rollout groups into fixed-shape micro-batches for Megatron's schedules.

A sequence is ``prompt ⧺ response``, right-padded to ``seq_length``; position ids are ``0..S−1``;
the model predicts token ``t+1`` at position ``t``, so response token ``j`` (sequence position
``P + j``) is scored at position ``P + j − 1``, where ``labels``, ``mask`` and ``behaviour_logprobs``
put it. Every micro-batch has exactly ``prompts_per_microbatch × K`` rows (pipeline stages exchange
fixed shapes); rows of padding carry ``group_index = −1`` and an all-zero mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_cropi.records import RolloutGroup

__all__ = ["PopiMicrobatch", "pack_microbatches", "sequence_length_for", "pad_sequence_length"]


@dataclass
class PopiMicrobatch:
    """One micro-batch of ``N = prompts × K`` sequences of length ``S``.

    Attributes:
        tokens: ``[N, S]`` int64 input ids.
        position_ids: ``[N, S]`` int64.
        labels: ``[N, S]`` int64 next-token targets.
        mask: ``[N, S]`` float32, 1 where ``labels`` is a response token.
        behaviour_logprobs: ``[N, S]`` float32 log β of ``labels`` (0 off the mask).
        rewards: ``[N]`` float32.
        group_index: ``[N]`` int64 group of each row within this micro-batch (−1: padding row).
        rows: ``[G]`` caller's row id of each group (e.g. its row in the feature store).
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    rewards: torch.Tensor
    group_index: torch.Tensor
    rows: list[int]

    @property
    def num_groups(self) -> int:
        return len(self.rows)

    def to(self, device) -> "PopiMicrobatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PopiMicrobatch(**moved)


def sequence_length_for(groups: Sequence[RolloutGroup]) -> int:
    """The longest prompt + response among ``groups``."""
    return max(len(g.prompt.token_ids) + len(r.token_ids) for g in groups for r in g.responses)


def pack_microbatches(
    groups: Sequence[RolloutGroup],
    rows: Sequence[int],
    *,
    prompts_per_microbatch: int,
    responses_per_prompt: int,
    seq_length: int,
    pad_id: int = 0,
) -> list[PopiMicrobatch]:
    """Micro-batches of ``prompts_per_microbatch`` groups each (the last one padded).

    Args:
        groups: rollout groups, each with at most ``responses_per_prompt`` responses.
        rows: caller's row id per group.
        seq_length: S; every prompt + response must fit.

    Raises:
        ValueError: naming the prompt id whose sequence does not fit or has too many responses, or
            whose log-probs do not match its tokens.
    """
    if len(groups) != len(rows):
        raise ValueError(f"{len(groups)} groups but {len(rows)} row ids")
    k, n = responses_per_prompt, prompts_per_microbatch * responses_per_prompt
    out = []
    for start in range(0, len(groups), prompts_per_microbatch):
        chunk = groups[start:start + prompts_per_microbatch]
        tokens = np.full((n, seq_length), pad_id, dtype=np.int64)
        labels = np.full((n, seq_length), pad_id, dtype=np.int64)
        mask = np.zeros((n, seq_length), dtype=np.float32)
        blp = np.zeros((n, seq_length), dtype=np.float32)
        rewards = np.zeros(n, dtype=np.float32)
        gidx = np.full(n, -1, dtype=np.int64)
        for gi, group in enumerate(chunk):
            if len(group.responses) > k:
                raise ValueError(f"prompt {group.prompt_id}: {len(group.responses)} responses, expected at most {k}")
            prompt = np.asarray(group.prompt.token_ids, dtype=np.int64)
            for ri, resp in enumerate(group.responses):
                row = gi * k + ri
                toks = np.asarray(resp.token_ids, dtype=np.int64)
                lps = np.asarray(resp.logprobs, dtype=np.float32)
                if len(lps) != len(toks):
                    raise ValueError(f"prompt {group.prompt_id} response {ri}: {len(toks)} tokens but "
                                     f"{len(lps)} behaviour log-probs")
                p, t = len(prompt), len(toks)
                if p + t > seq_length:
                    raise ValueError(f"prompt {group.prompt_id} response {ri}: {p}+{t} tokens exceed "
                                     f"seq_length {seq_length}")
                if p == 0:
                    raise ValueError(f"prompt {group.prompt_id} has no tokens")
                seq = np.concatenate([prompt, toks])
                tokens[row, : p + t] = seq
                labels[row, : p + t - 1] = seq[1:]
                mask[row, p - 1 : p + t - 1] = 1.0
                blp[row, p - 1 : p + t - 1] = lps
                rewards[row] = float(group.rewards[ri])
                gidx[row] = gi
        out.append(PopiMicrobatch(
            tokens=torch.from_numpy(tokens),
            position_ids=torch.arange(seq_length).unsqueeze(0).expand(n, seq_length).contiguous(),
            labels=torch.from_numpy(labels),
            mask=torch.from_numpy(mask),
            behaviour_logprobs=torch.from_numpy(blp),
            rewards=torch.from_numpy(rewards),
            group_index=torch.from_numpy(gidx),
            rows=list(rows[start:start + prompts_per_microbatch]),
        ))
    return out


def pad_sequence_length(mb: PopiMicrobatch, length: int) -> PopiMicrobatch:
    """``mb`` right-padded from ``S`` to ``length ≥ S`` positions: token 0, position ids going on, mask
    and behaviour log-probs 0. Under a causal mask the new positions change nothing at the old ones and
    carry no loss, so every gradient is unchanged (sequence parallelism needs ``S`` divisible by TP)."""
    n, s = mb.tokens.shape
    if length < s:
        raise ValueError(f"cannot pad a micro-batch of {s} positions to {length}")
    if length == s:
        return mb

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(n, length - s)], dim=1)

    positions = torch.arange(length, dtype=mb.position_ids.dtype, device=mb.position_ids.device)
    return PopiMicrobatch(tokens=pad(mb.tokens), position_ids=positions.unsqueeze(0).expand(n, length).contiguous(),
                          labels=pad(mb.labels), mask=pad(mb.mask), behaviour_logprobs=pad(mb.behaviour_logprobs),
                          rewards=mb.rewards, group_index=mb.group_index, rows=mb.rows)
