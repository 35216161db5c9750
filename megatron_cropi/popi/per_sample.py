"""Per-prompt parameter gradients from one batched backward: pure functions of activations.

A micro-batch holds ``G`` prompts × ``K`` responses as ``N = G·K`` consecutive sequences; Megatron's
activations are sequence-first, ``[S, N, features]``. The gradient of prompt ``g``'s loss with respect
to a parameter only involves its own K sequences (sequences do not interact), so from the input ``X``
and the output gradient ``dY`` a layer saw in the batched backward:

* linear ``Y = X Wᵀ (+ b)``:   ``dW_g = Σ_{n∈g} Σ_s dY[s,n]ᵀ X[s,n]``  (one bmm over ``[G, K·S, ·]``),
  ``db_g = Σ_{n∈g} Σ_s dY[s,n]``;
* RMSNorm ``y = γ ⊙ x / rms(x)``: ``dγ_g = Σ Σ dY ⊙ x̂``; LayerNorm also ``dβ_g = Σ Σ dY``;
* embedding lookup ``E[ids]``: ``dE_g[v] = Σ_{(n,s): ids=v} dY[n,s]`` over this rank's vocab rows.

Rows of padding (zero output gradient) add exact zeros. Inputs may be bf16/fp16; sums run in fp32.

Batched capture uses the *blocked* forms (:func:`linear_grad_blocks`, :func:`embedding_grad_blocks`,
:func:`norm_grads_chunked`): the same sums, formed a bounded block at a time
(:mod:`megatron_cropi.popi.blocks`) and handed to a callback that projects it before the next block is
made. The whole-tensor functions above them are their references (``tests/unit/test_per_sample.py``).
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_cropi.popi.blocks import BLOCK_BYTES, embedding_plan, linear_plan, norm_plan

__all__ = [
    "grouped_linear_weight_grads",
    "grouped_bias_grads",
    "grouped_norm_grads",
    "grouped_embedding_grads",
    "linear_grad_blocks",
    "embedding_grad_blocks",
    "norm_grads_chunked",
]


def _by_group(t: torch.Tensor, k: int) -> torch.Tensor:
    """``[S, N, ..., F]`` → ``[G, K·S·…, F]`` (sequence-first activations grouped by prompt).

    Extra middle dims are folded in with S: Qwen3's per-head q/k norms see ``[S, N, heads, d]``.
    """
    n = t.shape[1]
    if n % k != 0:
        raise ValueError(f"{n} sequences are not a whole number of groups of {k}")
    return t.transpose(0, 1).reshape(n // k, -1, t.shape[-1])


def grouped_linear_weight_grads(x: torch.Tensor, dy: torch.Tensor, k: int) -> torch.Tensor:
    """``[S, N, in]``, ``[S, N, out]`` → per-group ``dW`` ``[G, out, in]`` float32."""
    if x.shape[:2] != dy.shape[:2]:
        raise ValueError(f"input {tuple(x.shape)} and output-gradient {tuple(dy.shape)} disagree on [S, N]")
    xg = _by_group(x.float(), k)
    dyg = _by_group(dy.float(), k)
    return torch.bmm(dyg.transpose(1, 2), xg)


def grouped_bias_grads(dy: torch.Tensor, k: int) -> torch.Tensor:
    """``[S, N, out]`` → per-group ``db`` ``[G, out]`` float32."""
    return _by_group(dy.float(), k).sum(dim=1)


def grouped_norm_grads(x: torch.Tensor, dy: torch.Tensor, k: int, *, kind: str, eps: float):
    """Per-group gradients of a norm's affine parameters.

    Args:
        x: the norm's input ``[S, N, H]`` (or ``[S, N, heads, d]`` for per-head q/k norms).
        dy: gradient of its output, same shape.
        kind: ``"RMSNorm"`` or ``"LayerNorm"``.
        eps: the norm's epsilon.

    Returns:
        ``(dγ [G, H], dβ [G, H] or None)`` float32.
    """
    xf = x.float()
    if kind == "RMSNorm":
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    elif kind == "LayerNorm":
        mu = xf.mean(-1, keepdim=True)
        xhat = (xf - mu) * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    else:
        raise ValueError(f"unsupported norm {kind!r}; expected RMSNorm or LayerNorm")
    dgamma = _by_group(dy.float() * xhat, k).sum(dim=1)
    dbeta = _by_group(dy.float(), k).sum(dim=1) if kind == "LayerNorm" else None
    return dgamma, dbeta


def grouped_embedding_grads(ids: torch.Tensor, dy: torch.Tensor, k: int, *, vocab_start: int,
                            vocab_size_local: int) -> torch.Tensor:
    """Per-group gradient of this rank's embedding rows, ``[G, V_local, H]`` float32.

    Args:
        ids: ``[N, S]`` token ids (batch-first, as the embedding sees them).
        dy: ``[N, S, H]`` gradient of the looked-up embeddings.
        vocab_start: first global vocab id held by this rank.
        vocab_size_local: rows held by this rank.
    """
    n, s = ids.shape
    h = dy.shape[-1]
    local = ids - vocab_start
    keep = (local >= 0) & (local < vocab_size_local)
    group = torch.arange(n, device=ids.device).div(k, rounding_mode="floor")[:, None].expand(n, s)
    flat_index = (group * vocab_size_local + local.clamp(0, vocab_size_local - 1))[keep]
    out = torch.zeros((n // k) * vocab_size_local, h, dtype=torch.float32, device=dy.device)
    out.index_add_(0, flat_index, dy.float()[keep])
    return out.view(n // k, vocab_size_local, h)


# -- blocked forms (batched capture) ----------------------------------------------------------------

def _buffer(shape, device) -> torch.Tensor:
    """Every float32 block and factor chunk below is made here (``tests/unit/test_memory_capture.py``
    measures what is alive at once through it)."""
    return torch.empty(tuple(shape), dtype=torch.float32, device=device)


def _chunk(t: torch.Tensor, g0: int, g1: int, k: int, s0: int, s1: int, *, last: slice = slice(None),
           batch_first: bool = False) -> torch.Tensor:
    """float32 copy ``[c, K·(s1−s0)·…, F]`` of prompts ``g0:g1`` at positions ``s0:s1`` of ``t``
    (``[S, N, …, F]``, or ``[N, S, …, F]`` when ``batch_first``), features ``last`` only."""
    c = g1 - g0
    if batch_first:
        view = t[g0 * k:g1 * k, s0:s1][..., last]
        view = view.reshape(c, k, *view.shape[1:])
    else:
        view = t[s0:s1, g0 * k:g1 * k][..., last]
        view = view.reshape(s1 - s0, c, k, *view.shape[2:]).movedim(0, 2)
    out = _buffer(view.shape, t.device)
    out.copy_(view)
    return out.view(c, -1, out.shape[-1])


def _check_groups(n: int, k: int, groups: int) -> None:
    if n % k != 0 or groups * k > n:
        raise ValueError(f"{n} sequences are not a whole number of groups of {k} holding {groups} groups")


def linear_grad_blocks(x: torch.Tensor, dy: torch.Tensor, k: int, groups: int, rows: tuple[int, int],
                       emit: Callable, *, weight: bool = True, bias: bool = False,
                       block_bytes: int = BLOCK_BYTES) -> None:
    """Per-prompt ``dW`` (and ``db``) of the first ``groups`` prompts, rows ``rows`` of the local weight,
    in blocks (:func:`~megatron_cropi.popi.blocks.linear_plan`).

    Args:
        x: ``[S, N, in]`` layer input (all positions); dy: ``[S, N, out]`` output gradient.
        rows: ``(start, stop)`` local weight rows (a SwiGLU fc1 half, or all).
        emit: called as ``emit(g0, g1, r0, r1, dW, db)`` with ``dW`` ``[g1−g0, r1−r0, in]`` float32 (None
            unless ``weight``) and ``db`` ``[g1−g0, r1−r0]`` (None unless ``bias``); the blocks are freed
            when it returns.
    """
    if x.shape[:2] != dy.shape[:2]:
        raise ValueError(f"input {tuple(x.shape)} and output-gradient {tuple(dy.shape)} disagree on [S, N]")
    _check_groups(x.shape[1], k, groups)
    seq, cols, (start, stop) = x.shape[0], x.shape[-1], rows
    plan = linear_plan(groups=groups, responses=k, seq=seq, rows=stop - start, cols=cols, block_bytes=block_bytes)
    for g0 in range(0, groups, plan.prompts):
        g1 = min(groups, g0 + plan.prompts)
        for r0 in range(start, stop, plan.rows):
            r1 = min(stop, r0 + plan.rows)
            dw = _buffer((g1 - g0, r1 - r0, cols), x.device).zero_() if weight else None
            db = _buffer((g1 - g0, r1 - r0), x.device).zero_() if bias else None
            for s0 in range(0, seq, plan.steps):
                s1 = min(seq, s0 + plan.steps)
                dyc = _chunk(dy, g0, g1, k, s0, s1, last=slice(r0, r1))
                if db is not None:
                    db += dyc.sum(1)
                if dw is not None:
                    xc = _chunk(x, g0, g1, k, s0, s1)
                    dw.baddbmm_(dyc.transpose(1, 2), xc)
                    del xc
                del dyc
            emit(g0, g1, r0, r1, dw, db)
            del dw, db


def embedding_grad_blocks(ids: torch.Tensor, dy: torch.Tensor, k: int, groups: int, emit: Callable, *,
                          vocab_start: int, vocab_size_local: int, block_bytes: int = BLOCK_BYTES) -> None:
    """Per-prompt gradient of this rank's embedding rows, in blocks of rows
    (:func:`~megatron_cropi.popi.blocks.embedding_plan`).

    Args:
        ids: ``[N, S]`` token ids; dy: ``[N, S, h]`` gradient of the looked-up rows (batch-first).
        emit: called as ``emit(g0, g1, r0, r1, dE)`` with ``dE`` ``[g1−g0, r1−r0, h]`` float32, local rows
            ``r0:r1`` (global ids ``vocab_start + r0 …``).
    """
    n, seq = ids.shape
    h = dy.shape[-1]
    _check_groups(n, k, groups)
    plan = embedding_plan(groups=groups, responses=k, seq=seq, vocab_local=vocab_size_local, hidden=h,
                          block_bytes=block_bytes)
    for g0 in range(0, groups, plan.prompts):
        g1 = min(groups, g0 + plan.prompts)
        c = g1 - g0
        for r0 in range(0, vocab_size_local, plan.rows):
            r = min(vocab_size_local, r0 + plan.rows) - r0
            out = _buffer((c * r + 1, h), dy.device).zero_()  # the last row takes ids outside the block
            for s0 in range(0, seq, plan.steps):
                s1 = min(seq, s0 + plan.steps)
                dyc = _chunk(dy, g0, g1, k, s0, s1, batch_first=True)
                local = (ids[g0 * k:g1 * k, s0:s1] - (vocab_start + r0)).reshape(c, -1)
                keep = (local >= 0) & (local < r)
                base = torch.arange(c, device=ids.device)[:, None] * r
                index = torch.where(keep, base + local, torch.full_like(local, c * r))
                out.index_add_(0, index.reshape(-1), dyc.reshape(-1, h))
                del dyc
            emit(g0, g1, r0, r0 + r, out[:-1].view(c, r, h))
            del out


def norm_grads_chunked(x: torch.Tensor, dy: torch.Tensor, k: int, groups: int, *, kind: str, eps: float,
                       block_bytes: int = BLOCK_BYTES):
    """:func:`grouped_norm_grads` of the first ``groups`` prompts, over chunks of positions
    (:func:`~megatron_cropi.popi.blocks.norm_plan`): ``(dγ [G, h], dβ [G, h] or None)`` float32."""
    if kind not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"unsupported norm {kind!r}; expected RMSNorm or LayerNorm")
    _check_groups(x.shape[1], k, groups)
    seq, h = x.shape[0], x.shape[-1]
    vectors = x[0, 0].numel() // h
    plan = norm_plan(groups=groups, responses=k, seq=seq, hidden=h, vectors=vectors, block_bytes=block_bytes)
    dgamma = _buffer((groups, h), x.device).zero_()
    dbeta = _buffer((groups, h), x.device).zero_() if kind == "LayerNorm" else None
    for s0 in range(0, seq, plan.steps):
        s1 = min(seq, s0 + plan.steps)
        xc = _chunk(x, 0, groups, k, s0, s1)
        if kind == "RMSNorm":  # x / rms(x) in place; the norm's reduction makes no [.., h] temporary
            ms = torch.linalg.vector_norm(xc, dim=-1, keepdim=True).pow_(2).div_(h)
            xc.mul_(ms.add_(eps).rsqrt_())
        else:
            var, mu = torch.var_mean(xc, dim=-1, unbiased=False, keepdim=True)
            xc.sub_(mu).mul_(var.add_(eps).rsqrt_())
        dyc = _chunk(dy, 0, groups, k, s0, s1)
        if dbeta is not None:
            dbeta += dyc.sum(1)
        dgamma += dyc.mul_(xc).sum(1)
        del xc, dyc
    return dgamma, dbeta
