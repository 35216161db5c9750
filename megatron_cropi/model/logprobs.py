"""Token log-probabilities and entropy from vocab-parallel logits, without gathering the vocabulary,
and without holding the fp32 log-softmax of every token at once.

Under TP each rank holds logits ``z`` (already divided by the temperature ``T``) for its vocabulary
slice ``[start, start + V/TP)``. With the row maximum ``m`` (all-reduced MAX, no gradient needed:
log-softmax is shift invariant), the partition function ``Z = Σ_r Σ_{v∈r} exp(z_v − m)`` (all-reduced
SUM) and ``p_v = exp(z_v − m − log Z)``,

    log p(a) = z_a − m − log Z,          H = log Z + m − Σ_v p_v z_v,
    ∂ log p(a)/∂z_v = 1[v = a] − p_v,    ∂H/∂z_v = −p_v (z_v − Σ_u p_u z_u).

Both gradients on a rank need only its own slice and the replicated ``[tokens]`` statistics, so every
TP rank gets the exact gradient of its slice with no collective in the backward (every TP rank holds
the same replicated loss, as with Megatron's ``reduce_from_tensor_model_parallel_region``). Only
``[tokens]``-sized tensors cross the TP group, never ``[tokens, V]``.

**Chunking** (``chunk_tokens = c > 0``, the default :data:`DEFAULT_CHUNK_TOKENS`): the logits are
viewed as ``[N, V/TP]`` (``N`` = all leading dims) and walked ``c`` rows at a time by a custom autograd
function that keeps for backward only the logits themselves (which the output layer produced anyway)
and ``[N]`` statistics; the backward recomputes ``p`` chunk by chunk and writes the logits' gradient in
their own dtype. So the fp32 work tensors are ``[c, V/TP]``, never ``[N, V/TP]``: the transient
footprint beyond the logits and their gradient is ``≈ 4 · c · V/TP · 4`` bytes
(:func:`megatron_cropi.memory_activations.logits_bytes`). ``chunk_tokens = 0`` is the whole-tensor autograd
path (about three fp32 ``[N, V/TP]`` copies kept for backward per call), kept for comparison
(``benchmarks/logprob_memory.py``). Work tensors are fp32, or float64 for float64 logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_CHUNK_TOKENS", "vocab_parallel_logprobs", "vocab_parallel_entropy", "shift_for_next_token"]

DEFAULT_CHUNK_TOKENS = 1024
"""Rows (token positions) per chunk: at V/TP = 38k (Qwen2 at TP4) one fp32 chunk is 0.15 GiB."""


def _tp_active(tp_group) -> bool:
    return tp_group is not None and dist.get_world_size(tp_group) > 1


def _check_chunk(chunk_tokens: int) -> None:
    if not isinstance(chunk_tokens, int) or chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be an int >= 0 (0 = whole tensor), got {chunk_tokens!r}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# ---------------------------------------------------------------------------------------------------
# chunked path: custom autograd functions over [N, V/TP] row chunks


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _chunk(logits2d: torch.Tensor, i: int, j: int, temperature: float) -> torch.Tensor:
    """``z = logits[i:j] / T`` in the work dtype: ``[j − i, V/TP]``, a fresh tensor per chunk."""
    z = logits2d[i:j].to(_work_dtype(logits2d), copy=True)  # a copy even in float64: callers write into it
    return z.div_(temperature) if temperature != 1.0 else z


def _row_statistics(logits2d, temperature, chunk, tp_group, *, with_mean: bool):
    """``m``, ``log Z`` and (``with_mean``) ``Σ_v p_v z_v``, each ``[N]``, over the whole vocabulary.

    Two passes over the rows, one chunk at a time: the maximum (all-reduced MAX), then ``Σ exp(z − m)``
    and ``Σ exp(z − m)·z`` against that maximum (all-reduced SUM): the same arithmetic per row as the
    whole-tensor path.
    """
    n = logits2d.shape[0]
    dtype = _work_dtype(logits2d)
    m = torch.empty(n, dtype=dtype, device=logits2d.device)
    for i in range(0, n, chunk):
        m[i:i + chunk] = _chunk(logits2d, i, i + chunk, temperature).max(dim=-1).values
    if _tp_active(tp_group):
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    sums = torch.empty(2 if with_mean else 1, n, dtype=dtype, device=logits2d.device)
    for i in range(0, n, chunk):
        z = _chunk(logits2d, i, i + chunk, temperature)
        e = torch.exp(z - m[i:i + chunk, None])
        sums[0, i:i + chunk] = e.sum(dim=-1)
        if with_mean:
            sums[1, i:i + chunk] = (e * z).sum(dim=-1)
    if _tp_active(tp_group):
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
    log_z = torch.log(sums[0])
    return m, log_z, (sums[1] / sums[0] if with_mean else None)


class _ChunkedLogprobs(torch.autograd.Function):
    """``[N, V/TP]`` logits, ``[N]`` global targets → ``[N]`` log-probs (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits2d, targets, temperature, chunk, tp_group, tp_rank):
        m, log_z, _ = _row_statistics(logits2d, temperature, chunk, tp_group, with_mean=False)
        v_local = logits2d.shape[-1]
        local = targets - tp_rank * v_local
        in_range = (local >= 0) & (local < v_local)
        local = local.clamp(0, v_local - 1)
        # the target's logit, read straight from the logits: [N, 1], no [N, V] copy
        picked = torch.gather(logits2d, -1, local.unsqueeze(-1)).squeeze(-1).to(m.dtype)
        picked = picked / temperature if temperature != 1.0 else picked
        z_target = torch.where(in_range, picked, torch.zeros_like(picked))
        if _tp_active(tp_group):
            dist.all_reduce(z_target, op=dist.ReduceOp.SUM, group=tp_group)
        ctx.save_for_backward(logits2d, local, in_range, m + log_z)
        ctx.temperature, ctx.chunk = temperature, chunk
        return z_target - m - log_z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits2d, local, in_range, shift = ctx.saved_tensors
        t, c = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits2d)
        g = grad_out.to(shift.dtype)
        for i in range(0, logits2d.shape[0], c):
            p = torch.exp(_chunk(logits2d, i, i + c, t) - shift[i:i + c, None])
            gz = p.mul_(-g[i:i + c, None])  # −g·p_v, then +g at the target where this rank holds it
            hit = torch.where(in_range[i:i + c], g[i:i + c], torch.zeros_like(g[i:i + c]))
            gz.scatter_add_(-1, local[i:i + c, None], hit[:, None])
            grad[i:i + c] = gz.div_(t) if t != 1.0 else gz
        return grad, None, None, None, None, None


class _ChunkedEntropy(torch.autograd.Function):
    """``[N, V/TP]`` logits → ``[N]`` entropy of ``softmax(logits / T)`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits2d, temperature, chunk, tp_group):
        m, log_z, mean_z = _row_statistics(logits2d, temperature, chunk, tp_group, with_mean=True)
        ctx.save_for_backward(logits2d, m + log_z, mean_z)
        ctx.temperature, ctx.chunk = temperature, chunk
        return log_z + m - mean_z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits2d, shift, mean_z = ctx.saved_tensors
        t, c = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits2d)
        g = grad_out.to(shift.dtype)
        for i in range(0, logits2d.shape[0], c):
            z = _chunk(logits2d, i, i + c, t)
            p = torch.exp(z - shift[i:i + c, None])
            gz = z.sub_(mean_z[i:i + c, None]).mul_(p).mul_(-g[i:i + c, None])  # −g·p_v·(z_v − Σ p z)
            grad[i:i + c] = gz.div_(t) if t != 1.0 else gz
        return grad, None, None, None


# ---------------------------------------------------------------------------------------------------
# whole-tensor path (chunk_tokens = 0): plain autograd through [N, V/TP] fp32 tensors


def _reduce(x: torch.Tensor, tp_group) -> torch.Tensor:
    if not _tp_active(tp_group):
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=tp_group)


def _shifted(logits: torch.Tensor, temperature: float, tp_group):
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    m = z.detach().max(dim=-1, keepdim=True).values
    if _tp_active(tp_group):
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    e = torch.exp(z - m)
    log_z = torch.log(_reduce(e.sum(dim=-1), tp_group))
    return z, m.squeeze(-1), e, log_z


def _whole_logprobs(logits, targets, tp_group, tp_rank, temperature):
    z, m, _, log_z = _shifted(logits, temperature, tp_group)
    v_local = z.shape[-1]
    local = targets - tp_rank * v_local
    in_range = (local >= 0) & (local < v_local)
    picked = torch.gather(z, -1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    z_target = _reduce(torch.where(in_range, picked, torch.zeros_like(picked)), tp_group)
    return z_target - m - log_z


def _whole_entropy(logits, tp_group, temperature):
    z, m, e, log_z = _shifted(logits, temperature, tp_group)
    # H = log Z + m − (Σ_v e_v z_v) / Z with the *unnormalised* sum reduced over TP: every cross-rank
    # dependency then passes through replicated scalars, where the reduction's identity backward is
    # exact. (Reducing Σ_v p_v z_v instead drops the other ranks' ∂p_u/∂Z terms from each rank's
    # gradient.)
    return log_z + m - _reduce((e * z).sum(dim=-1), tp_group) / torch.exp(log_z)


# ---------------------------------------------------------------------------------------------------
# public API


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    tp_rank: int = 0,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """``log softmax(logits / T)[target]`` for every position, from this rank's vocabulary slice.

    Args:
        logits: ``[..., V/TP]`` (any float dtype; computed in fp32), rank ``tp_rank``'s slice.
        targets: ``[...]`` global token ids.
        tp_group: the tensor-parallel group (None or size 1: plain log-softmax).
        tp_rank: this rank's index in ``tp_group``.
        temperature: the ``T`` of the distribution (the one that sampled, for behaviour ratios).
        chunk_tokens: positions per fp32 work chunk (``scoring.logprob_chunk_tokens``,
            ``grpo.logprob_chunk_tokens``); 0 = the whole ``[..., V/TP]`` at once.

    Returns:
        ``[...]`` float32 log-probs (float64 for float64 logits on the chunked path), identical on
        every TP rank.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [...]")
    _check_temperature(temperature)
    _check_chunk(chunk_tokens)
    if chunk_tokens == 0:
        return _whole_logprobs(logits, targets, tp_group, tp_rank, temperature)
    v_local = logits.shape[-1]
    out = _ChunkedLogprobs.apply(logits.reshape(-1, v_local), targets.reshape(-1), float(temperature),
                                 chunk_tokens, tp_group, tp_rank)
    return out.reshape(targets.shape)


def vocab_parallel_entropy(logits: torch.Tensor, *, tp_group=None, temperature: float = 1.0,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Entropy ``H = −Σ_v p_v log p_v`` of ``softmax(logits / T)`` per position: ``[..., V/TP] → [...]``.

    ``chunk_tokens`` as in :func:`vocab_parallel_logprobs`.
    """
    _check_temperature(temperature)
    _check_chunk(chunk_tokens)
    if chunk_tokens == 0:
        return _whole_entropy(logits, tp_group, temperature)
    out = _ChunkedEntropy.apply(logits.reshape(-1, logits.shape[-1]), float(temperature), chunk_tokens, tp_group)
    return out.reshape(logits.shape[:-1])


def shift_for_next_token(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Labels for next-token prediction: ``labels[:, t] = tokens[:, t + 1]``, last column ``pad_id``."""
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    return labels
