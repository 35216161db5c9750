"""Sampling math shared by the native sampler and the tests: pure functions of tensors.

* :func:`process_logits`: the distribution actually sampled from, ``logits / T`` with tokens outside
  the top-p nucleus set to ``-inf`` (vLLM's ``processed_logprobs`` convention: the nucleus is the
  smallest prefix of the probability-sorted vocabulary whose mass reaches ``top_p``).
* :func:`token_logprobs`: behaviour log-probs of given tokens, ``"sampling"`` (of the processed
  distribution, renormalised) or ``"raw"`` (``log_softmax(logits)``).
* :func:`counter_uniform` / :func:`sample_tokens`: Gumbel-max sampling whose noise is a hash of
  ``(sequence key, step, vocabulary index)``. A sample depends on the prompt, its sample index and the
  seed only: not on batch composition, on the order prompts are visited, on a resume, or on the TP
  size (every rank sees the full, gathered vocabulary).
"""

from __future__ import annotations

import hashlib
from typing import Literal, Sequence

import torch

__all__ = ["process_logits", "token_logprobs", "sequence_keys", "counter_uniform", "sample_tokens"]

_M32 = 0xFFFFFFFF


def process_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """``[..., V]`` logits → the sampled distribution's logits (fp32): ``logits / T`` with tokens outside
    the top-p nucleus at ``-inf``. ``T == 0`` (greedy) leaves the logits unscaled."""
    z = logits.float()
    if temperature > 0:
        z = z / temperature
    if top_p < 1.0:
        probs = torch.softmax(z, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        drop_sorted = mass_before >= top_p  # the first token always stays (mass_before = 0 < top_p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    mode: Literal["sampling", "raw"] = "sampling",
) -> torch.Tensor:
    """Log-prob of ``tokens [...]`` under ``logits [..., V]``: of the processed distribution
    (``mode="sampling"``; greedy ``T=0`` falls back to raw) or of ``log_softmax(logits)`` (``"raw"``)."""
    if mode == "sampling" and temperature > 0:
        z = process_logits(logits, temperature, top_p)
    else:
        z = logits.float()
    return torch.log_softmax(z, dim=-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def sequence_keys(seed: int, prompt_ids: Sequence[str], n: int) -> torch.Tensor:
    """``int64 [len(prompt_ids) × n]`` keys of the sequences ``(prompt, k)``, prompt-major: a 62-bit
    hash of ``(seed, prompt_id, k)``."""
    keys = []
    for pid in prompt_ids:
        for k in range(n):
            digest = hashlib.blake2b(f"{seed}:{pid}:{k}".encode(), digest_size=8).digest()
            keys.append(int.from_bytes(digest, "little") >> 2)
    return torch.tensor(keys, dtype=torch.int64)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # murmur3's finaliser on values in [0, 2^32) held in int64; products wrap and the mask keeps the low 32 bits
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def counter_uniform(keys: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """``float64 [R, V]`` uniforms in (0, 1), a pure function of ``(keys[r], step, v)``."""
    lo = (keys & _M32).unsqueeze(1)
    hi = ((keys >> 32) & _M32).unsqueeze(1)
    v = torch.arange(vocab_size, dtype=torch.int64, device=keys.device).unsqueeze(0)
    h = _fmix32((v * 0x9E3779B1 + step * 0x7FEB352D + 0x165667B1) & _M32)
    h = _fmix32(h ^ lo)
    h = _fmix32((h + hi * 0x27D4EB2F) & _M32)
    return (h.double() + 0.5) / 4294967296.0


def sample_tokens(processed: torch.Tensor, keys: torch.Tensor, step: int, *, greedy: bool = False) -> torch.Tensor:
    """One token per row of ``processed [R, V]`` (the sampled distribution's logits): Gumbel-max with
    counter-based noise, so ``P(token = v) = softmax(processed)[v]``; ``greedy`` takes the argmax."""
    if greedy:
        return processed.argmax(dim=-1)
    u = counter_uniform(keys, step, processed.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (processed.double() + gumbel).argmax(dim=-1)
