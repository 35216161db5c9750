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
"""

from __future__ import annotations

import torch

__all__ = [
    "grouped_linear_weight_grads",
    "grouped_bias_grads",
    "grouped_norm_grads",
    "grouped_embedding_grads",
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
