"""A rollout engine that runs this rank's Megatron ``GPTModel`` itself (tiny models, the CPU default,
and the exactness oracle for behaviour log-probs).

Many prompts × ``n`` samples are decoded at once, one token per row and step, drawn from the last
position's logits. By default (``kv_cache=True``, ``rollout.native.kv_cache``) the prompt is run once
and each step feeds only the last token through Megatron's KV cache (``StaticInferenceContext``);
``kv_cache=False`` runs the whole sequence so far every step, the oracle the cached path is tested
against (:mod:`~megatron_cropi.rollout.decode`). Conventions, shared with every consumer of the
trajectory store:

* the sequence the model sees is ``prompt.token_ids ++ response.token_ids``: position ids
  ``0..S-1``, Megatron's causal mask (:func:`~megatron_cropi.model.schedule.causal_attention_mask`),
  no padding mask. Whatever padding a prompt carries (the synthetic suite left-pads to 14) is part of
  its ``token_ids``; prompts are batched only with prompts of the same length, so no batch adds
  padding. A consumer may right-pad (the causal mask makes it invisible) but never left-pad.
* TP: logits are vocab-parallel ``[B, S, V/TP]``; the last position's logits are all-gathered over
  the TP group (``[R, V]``, small for the models this engine serves) so top-p sees the whole vocabulary
  and every TP rank draws the same token from the same counter-based noise.
* PP must be 1 (sampling token by token through a pipeline is vLLM's job).
* Behaviour log-probs: ``sampling.logprobs == "sampling"``: of the distribution sampled from
  (``log_softmax`` of ``logits / T`` with the top-p nucleus renormalised); ``"raw"``: ``log_softmax(logits)``.
  ``temperature == 0`` is greedy and stores raw log-probs.
* Randomness: the noise of sample ``k`` of a prompt is a hash of ``(sampling.seed, prompt_id, k, step)``
  (:mod:`~megatron_cropi.rollout.sampling`), so results do not depend on batching or on resuming.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.rollout.decode import FullSequenceDecoder, KVCacheDecoder, gather_vocab, kv_cache_supported
from megatron_cropi.rollout.sampling import process_logits, sample_tokens, sequence_keys, token_logprobs
from megatron_cropi.records import PromptRecord, Response, SamplingParams

__all__ = ["NativeSampler", "gather_vocab"]

log = logging.getLogger(__name__)


class NativeSampler:
    """Samples with this rank's Megatron model stage (implements ``RolloutEngine``).

    Every rank of a TP group must call :meth:`generate` with the same prompts (collectives inside);
    all of them return the same responses.

    Args:
        model: the ``GPTModel`` from :func:`~megatron_cropi.model.provider.build_gpt_model` (PP = 1).
        groups: this rank's process groups.
        stop_token_ids: a response ends after emitting one of these (the tokenizer's EOS).
        max_batch_sequences: rows (prompts × n) per forward.
        kv_cache: decode through Megatron's KV cache (default); ``False``: rerun the whole sequence every
            step (the oracle). A model the cache cannot serve (:func:`kv_cache_supported`) falls back.

    Raises:
        ValueError: PP > 1 (the message points to the vLLM engine).
    """

    def __init__(self, model, groups: ParallelGroups, *, stop_token_ids: Sequence[int],
                 max_batch_sequences: int = 1024, kv_cache: bool = True):
        if groups.pp_size != 1:
            raise ValueError(
                f"the native sampler needs pipeline_model_parallel_size=1, got PP={groups.pp_size}; sample a "
                "pipeline-parallel model with the vLLM engine (rollout.engine: vllm) from an HF checkpoint"
            )
        if not stop_token_ids:
            raise ValueError("stop_token_ids must name at least one token (the tokenizer's EOS)")
        self.model = model
        self.groups = groups
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.max_batch_sequences = int(max_batch_sequences)
        self.max_sequence_length = int(getattr(model, "max_sequence_length", 1 << 30))
        reason = kv_cache_supported(model, groups) if kv_cache else None
        if reason is not None:
            log.warning("native sampler: no KV cache (%s); every step reruns the whole sequence", reason)
        self.kv_cache = bool(kv_cache) and reason is None

    @torch.no_grad()
    def generate(self, prompts: Sequence[PromptRecord], sampling: SamplingParams) -> list[list[Response]]:
        """``sampling.n`` responses per prompt, in prompt order (see the module docstring)."""
        out: list[list[Response] | None] = [None] * len(prompts)
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_len[len(p.token_ids)].append(i)
        per_chunk = max(1, self.max_batch_sequences // max(1, sampling.n))
        for length in sorted(by_len):
            if length + sampling.max_tokens > self.max_sequence_length:
                raise ValueError(f"prompt length {length} + max_tokens {sampling.max_tokens} exceeds the model's "
                                 f"max_sequence_length {self.max_sequence_length}")
            idx = by_len[length]
            for start in range(0, len(idx), per_chunk):
                chunk = idx[start:start + per_chunk]
                for i, responses in zip(chunk, self._generate_chunk([prompts[i] for i in chunk], sampling)):
                    out[i] = responses
        return out  # type: ignore[return-value]

    def _generate_chunk(self, prompts: Sequence[PromptRecord], sp: SamplingParams) -> list[list[Response]]:
        n = sp.n
        device = self.groups.device
        prompt = torch.as_tensor(np.stack([p.token_ids for p in prompts]), dtype=torch.long, device=device)
        keys = sequence_keys(sp.seed, [p.prompt_id for p in prompts], n).to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            gen, lps = self._decode(prompt, keys, sp)  # row r = prompt r // n, sample r % n
        finally:
            self.model.train(was_training)
        stop_set = set(self.stop_token_ids)
        result: list[list[Response]] = []
        for p in range(len(prompts)):
            group = []
            for k in range(n):
                r = p * n + k
                ids = gen[r]
                end = next((t + 1 for t, x in enumerate(ids) if int(x) in stop_set), None)
                stop = end if end is not None else len(ids)
                group.append(Response(token_ids=ids[:stop].copy(), logprobs=lps[r, :stop].copy(),
                                      finished=end is not None))
            result.append(group)
        return result

    def _decode(self, prompt: torch.Tensor, keys: torch.Tensor, sp: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
        """Prompts ``[B, P]`` × ``sp.n`` samples → tokens ``int32 [R, t]`` and behaviour log-probs
        ``float32 [R, t]``, ``R = B n`` (row ``r``: prompt ``r // n``), ``t <= max_tokens`` (decoding stops
        once every row has emitted a stop token)."""
        rows = prompt.shape[0] * sp.n
        decoder = (KVCacheDecoder(self.model, prompt, sp.n, sp.max_tokens) if self.kv_cache
                   else FullSequenceDecoder(self.model, self.groups, prompt, sp.n))
        stops = torch.tensor(self.stop_token_ids, dtype=torch.long, device=prompt.device)
        done = torch.zeros(rows, dtype=torch.bool, device=prompt.device)
        new_tokens, new_logprobs = [], []
        greedy = sp.temperature == 0
        for step in range(sp.max_tokens):
            logits = decoder.next_logits()  # [R, V], the same on every TP rank
            processed = process_logits(logits, sp.temperature, sp.top_p)
            tok = sample_tokens(processed, keys, step, greedy=greedy)
            lp = token_logprobs(logits, tok, temperature=sp.temperature, top_p=sp.top_p, mode=sp.logprobs)
            new_tokens.append(tok)
            new_logprobs.append(lp)
            done |= torch.isin(tok, stops)
            if bool(done.all()) or step + 1 == sp.max_tokens:
                break
            decoder.append(tok)
        gen = torch.stack(new_tokens, dim=1).cpu().numpy().astype(np.int32)
        lps = torch.stack(new_logprobs, dim=1).cpu().numpy().astype(np.float32)
        return gen, lps
