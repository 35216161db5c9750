"""The POPI loss (docs/design.md §4.1) as pure functions of tensors.

For prompt ``s`` with ``K`` stored responses ``τ_k`` (tokens ``a_{k,t}``), rewards ``r_k`` and
behaviour log-probs ``log β``::

    A_k     = (r_k − mean_j r_j) / (std_j r_j + ε)            ε = 1e-4, unbiased std
    ρ_{k,t} = exp(log π_θ(a_{k,t}) − log β(a_{k,t}))
    L(θ; s) = −(1/K) Σ_k (1/|τ_k|) Σ_t ρ_{k,t} · A_k

Options: PPO clipping of ρ (``min(ρA, clip(ρ, 1−ε_c, 1+ε_c)A)``; off by default, as in the paper's
released pipeline) and the self-normalised group statistics variant (weights
``w_k = exp(mean_t log π_θ − mean_t log β)``, weighted mean and std of the rewards). Advantages are
constants (no gradient flows through the group statistics). At θ = β every ρ is 1 and ∇L is the
on-policy GRPO surrogate gradient ``−(1/K) Σ_k (1/|τ_k|) Σ_t A_k ∇ log π_θ(a_{k,t})``.

Sequences of several prompts are processed together: ``group_index[n]`` names the prompt (group) of
sequence ``n``; ``−1`` marks padding sequences, which contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cropi.config.loader import require

__all__ = ["PopiLossConfig", "group_advantages", "popi_group_losses"]


@dataclass(frozen=True, kw_only=True)
class PopiLossConfig:
    """Options of the scored loss."""

    clip_eps: float | None = None
    """PPO clip range for the importance ratio; None (default) = unclipped, as the paper's pipeline."""
    self_normalized: bool = False
    """Self-normalised importance-weighted group statistics (the paper code's ``_acg`` variant)."""
    adv_eps: float = 1e-4
    """ε in ``(r − mean) / (std + ε)``."""

    def __post_init__(self):
        if self.clip_eps is not None:
            require(0 < self.clip_eps < 1, "clip_eps", self.clip_eps, "must be in (0, 1) or null")
        require(self.adv_eps > 0, "adv_eps", self.adv_eps, "must be > 0")


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, *,
                     eps: float = 1e-4, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Group-normalised advantages ``[N]`` for sequences ``[N]`` in ``num_groups`` groups.

    Args:
        rewards: ``[N]`` rewards.
        group_index: ``[N]`` group of each sequence, ``−1`` for padding (advantage 0).
        eps: added to the std.
        weights: ``[N]`` optional importance weights for the self-normalised statistics
            (weighted mean, weighted biased std); without them the std is unbiased (``K − 1``).

    Groups of one sequence, or whose rewards are all equal, get advantage exactly 0.
    """
    valid = group_index >= 0
    g = group_index.clamp(min=0)
    r = rewards.to(torch.float64)
    w = torch.ones_like(r) if weights is None else weights.to(torch.float64).detach()
    w = torch.where(valid, w, torch.zeros_like(w))
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    wsum = zeros.clone().index_add_(0, g, w)
    mean = zeros.clone().index_add_(0, g, w * r) / wsum.clamp(min=1e-30)
    dev2 = w * (r - mean[g]) ** 2
    ss = zeros.clone().index_add_(0, g, dev2)
    count = zeros.clone().index_add_(0, g, valid.to(torch.float64))
    if weights is None:
        std = torch.sqrt(ss / (count - 1).clamp(min=1))
    else:
        std = torch.sqrt(ss / wsum.clamp(min=1e-30))
    adv = (r - mean[g]) / (std[g] + eps)
    # exact zeros where there is no signal: padding, singleton groups, all-equal rewards
    degenerate = (count[g] < 2) | (ss[g] == 0) | ~valid
    return torch.where(degenerate, torch.zeros_like(adv), adv).to(torch.float32)


def popi_group_losses(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_groups: int,
    cfg: PopiLossConfig = PopiLossConfig(),
) -> torch.Tensor:
    """Per-group POPI losses ``[num_groups]``.

    Args:
        logprobs: ``[N, T]`` current-policy log-probs of the stored tokens (differentiable).
        behaviour_logprobs: ``[N, T]`` log β of the same tokens.
        mask: ``[N, T]`` 1 on response tokens, 0 elsewhere.
        rewards: ``[N]``.
        group_index: ``[N]`` group of each sequence (``−1``: padding).
        num_groups: G.
        cfg: clipping / self-normalisation.

    Returns:
        ``[G]`` float32; ``L_g = −(1/K_g) Σ_{n∈g} (1/|τ_n|) Σ_t term_{n,t}``.
    """
    if not (logprobs.shape == behaviour_logprobs.shape == mask.shape):
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, behaviour_logprobs {tuple(behaviour_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must have the same [N, T] shape"
        )
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(-1).clamp(min=1)
    diff = (logprobs - behaviour_logprobs.to(logprobs.dtype)) * mask
    weights = None
    if cfg.self_normalized:
        weights = torch.exp(diff.detach().sum(-1) / lengths)
    adv = group_advantages(rewards, group_index, num_groups, eps=cfg.adv_eps, weights=weights).to(logprobs.dtype)
    ratio = torch.exp(diff)
    term = ratio * adv[:, None]
    if cfg.clip_eps is not None:
        clipped = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv[:, None]
        term = torch.minimum(term, clipped)
    per_seq = (term * mask).sum(-1) / lengths
    valid = group_index >= 0
    g = group_index.clamp(min=0)
    per_seq = torch.where(valid, per_seq, torch.zeros_like(per_seq))
    count = torch.zeros(num_groups, dtype=per_seq.dtype, device=per_seq.device).index_add_(
        0, g, valid.to(per_seq.dtype))
    total = torch.zeros(num_groups, dtype=per_seq.dtype, device=per_seq.device).index_add_(0, g, per_seq)
    return -total / count.clamp(min=1)
