"""Next-token logits for the native sampler: two interchangeable decoders over one batch of rows.

Both take the prompt tokens ``[B, P]`` (every prompt the same length, no padding) and ``n`` samples
per prompt, ``R = B n`` rows (row ``r`` = prompt ``r // n``, sample ``r % n``), and step by step give
the last position's logits over the *whole* vocabulary ``[R, V]`` (fp32, identical on every TP rank)
and take the token drawn from them:

    dec = KVCacheDecoder(model, prompt, n, max_new_tokens)    # or FullSequenceDecoder(model, groups, prompt, n)
    for step in range(max_new_tokens):
        logits = dec.next_logits()   # [R, V]: p(x_{P+step} | x_{<P+step})
        dec.append(tok)              # tok [R]

* :class:`FullSequenceDecoder` (``rollout.native.kv_cache: false``, the oracle): step ``t`` runs the
  whole sequence ``[R, P + t]`` forward under the causal mask, ``O(R (P+t)^2)`` attention per step,
  and all-gathers the vocab-parallel last-position logits over TP (:func:`gather_vocab`).
* :class:`KVCacheDecoder` (default): Megatron-Core's own static-batching inference path. A
  ``StaticInferenceContext`` is passed to ``GPTModel.forward(..., inference_context=ctx)``; each
  attention layer stores its keys/values ``[P + T, R, G/TP, d]`` in ``ctx.key_value_memory_dict`` and
  reads them back. Step 0 (*prefill*) runs the ``B`` distinct prompts ``[B, P]`` once under the causal
  mask (the ``n`` samples of a prompt share it: ``n`` times fewer prefill FLOPs), then
  ``ctx.swap_key_value_dict`` copies cache row ``r // n`` into row ``r``; every later step runs
  ``[R, 1]`` (no mask: the one query sees the whole cache). RoPE is applied at positions
  ``ctx.sequence_len_offset + i`` (Megatron slices its table by the offset; ``position_ids`` only feed
  learned absolute embeddings). Megatron materialises only the last position's logits and gathers them
  over TP itself (``runtime_gather_output=True``: TP rank order = vocab order, as in :func:`gather_vocab`).

The two agree to fp32 rounding (a ``[1, S]`` attention row is summed in another order than a row of an
``[S, S]`` block; ``tests/distributed/test_native_sampler_kv_cache.py`` bounds the difference).
"""

from __future__ import annotations

import torch

from megatron_cropi.model.schedule import causal_attention_mask
from megatron_cropi.parallel import ParallelGroups

__all__ = ["gather_vocab", "FullSequenceDecoder", "KVCacheDecoder", "kv_cache_supported"]


def gather_vocab(local_logits: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """``[R, V/TP]`` vocab-parallel logits → ``[R, V]`` on every TP rank (TP rank order = vocab order)."""
    if groups.tp_size == 1:
        return local_logits
    import torch.distributed as dist

    parts = [torch.empty_like(local_logits) for _ in range(groups.tp_size)]
    dist.all_gather(parts, local_logits.contiguous(), group=groups.tp)
    return torch.cat(parts, dim=-1)


def kv_cache_supported(model, groups: ParallelGroups) -> str | None:
    """``None`` when :class:`KVCacheDecoder` serves ``model``, else why not (the sampler then falls back
    to :class:`FullSequenceDecoder`). Sequence parallelism at TP > 1 splits the sequence dimension over
    TP ranks, which a one-token decode step cannot be (megatron-core's own static-batching generation
    refuses SP for dense models too: ``TextGenerationController``, NotImplementedError)."""
    config = getattr(model, "config", None)
    if groups.tp_size > 1 and bool(getattr(config, "sequence_parallel", False)):
        return "sequence_parallel at TP > 1 (a 1-token decode step cannot be split over TP ranks)"
    return None


class FullSequenceDecoder:
    """No cache: step ``t`` runs the sequence so far, ``[R, P + t]``, forward (see the module docstring)."""

    def __init__(self, model, groups: ParallelGroups, prompt: torch.Tensor, n: int):
        self.model = model
        self.groups = groups
        self.tokens = prompt.repeat_interleave(n, dim=0)  # [R, P + t]

    def next_logits(self) -> torch.Tensor:
        """``[R, V]`` fp32 logits of the next token."""
        rows, seq = self.tokens.shape
        device = self.tokens.device
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(rows, seq)
        local = self.model(input_ids=self.tokens, position_ids=position_ids,
                           attention_mask=causal_attention_mask(seq, device))[:, -1, :]
        return gather_vocab(local.float(), self.groups)

    def append(self, tok: torch.Tensor) -> None:
        """Extend every row by ``tok [R]``."""
        self.tokens = torch.cat([self.tokens, tok.unsqueeze(1)], dim=1)


class KVCacheDecoder:
    """Prefill once, then one token per step through Megatron's ``StaticInferenceContext``.

    Args:
        model: the ``GPTModel`` (or a wrapper forwarding keyword arguments), in eval mode: Megatron
            uses the cache only when ``model.training`` is False.
        prompt: ``[B, P]`` token ids, one row per prompt.
        n: samples per prompt; the cache has ``R = B n`` rows.
        max_new_tokens: ``T``; the cache holds ``P + T`` positions per row (``[P + T, R, G/TP, d]``
            keys and values per layer, freed with the decoder).
    """

    def __init__(self, model, prompt: torch.Tensor, n: int, max_new_tokens: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        prompts, length = prompt.shape
        self.model = model
        self.n = int(n)
        self.ctx = StaticInferenceContext(max_batch_size=prompts * self.n, max_sequence_length=length + max_new_tokens)
        self.pending = prompt  # tokens not yet in the cache: the prompts, then the last drawn token of every row

    def next_logits(self) -> torch.Tensor:
        """``[R, V]`` fp32 logits of the next token (the full vocabulary on every TP rank)."""
        batch, seq = self.pending.shape
        offset = self.ctx.sequence_len_offset
        device = self.pending.device
        position_ids = torch.arange(offset, offset + seq, device=device).unsqueeze(0).expand(batch, seq)
        # prefill: the prompt attends causally to itself; decode: one query, every cached key visible
        mask = causal_attention_mask(seq, device) if offset == 0 else None
        logits = self.model(input_ids=self.pending, position_ids=position_ids, attention_mask=mask,
                            inference_context=self.ctx, runtime_gather_output=True)[:, -1, :].float()
        self.ctx.increment_sequence_len_offset(seq)
        if offset == 0 and self.n > 1:
            # prefill filled cache rows 0..B-1; row r of the decode batch continues prompt r // n
            rows = torch.arange(batch, device=device).repeat_interleave(self.n)
            self.ctx.swap_key_value_dict(rows)
            logits = logits.repeat_interleave(self.n, dim=0)
        self.ctx.enable_decode_mode()
        return logits

    def append(self, tok: torch.Tensor) -> None:
        """The next forward feeds ``tok [R]`` (its keys/values enter the cache then)."""
        self.pending = tok.unsqueeze(1)
