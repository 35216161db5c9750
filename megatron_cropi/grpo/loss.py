"""The GRPO objective as pure functions of tensors.

For response tokens ``t`` of sequence ``n`` with current log-probs ``log π``, old-policy log-probs
``log π_old`` (the sampler's), reference log-probs ``log π_ref`` and group-normalised advantage ``A_n``::

    ρ_{n,t}   = exp(clamp(log π − log π_old, −20, 20))
    pg_{n,t}  = max(−A_n ρ, −A_n clip(ρ, 1 − ε_low, 1 + ε_high))            clip-higher when ε_high > ε_low
    pg_{n,t}  = min(pg_{n,t}, −A_n c)             where A_n < 0              dual clip (verl's clip_ratio_c)
    kl_{n,t}  = k1: d  |  k2: d²/2  |  low_var_kl: clamp(e^{−d} + d − 1, −10, 10),  d = log π − log π_ref
    ℓ_{n,t}   = pg + β_kl · kl − β_H · H_{n,t}
    L         = Σ_{n,t} m ℓ / N_tokens                                       token-mean
              = Σ_n (Σ_t m ℓ / |τ_n|) / N_seqs                               seq-mean-token-mean

``N_tokens`` / ``N_seqs`` count the response tokens / non-empty sequences of the *whole step* (every
micro-batch on every data-parallel rank): :class:`LossNormalizer` carries them into each micro-batch's
loss, so the sum of the micro-batch losses over all ranks is exactly ``L`` (the trainer undoes
Megatron's ``/num_microbatches`` and DDP's ``/dp``). ``d`` is clamped to [−20, 20] in ``low_var_kl``
like verl's. Advantages are constants: no gradient flows through the rewards.

With recomputed old log-probs, the rollout engine's own log-probs ``log μ`` (vLLM, bf16) are passed as
``rollout_logprobs``; with δ = log π_old − log μ per token the sums of ``|δ|`` and of the k3 estimate
of KL(μ ‖ π_old), ``e^δ − 1 − δ`` (unbiased on tokens sampled from μ, ≥ 0), measure the engine/trainer
mismatch, and truncated importance sampling (``tis_imp_ratio_cap`` = C, verl's TIS) weights the
policy-gradient term::

    w_{n,t}   = min(exp(clamp(δ, −20, 20)), C)          a constant (no gradient)
    pg_{n,t} ← w_{n,t} · pg_{n,t}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_cropi.grpo.config import GrpoLossConfig

__all__ = [
    "LossNormalizer", "policy_gradient_terms", "kl_penalty", "aggregate", "grpo_loss", "STAT_KEYS",
    "finalize_stats", "truncated_is_weights", "MISMATCH_KEYS",
]

STAT_KEYS = ("tokens", "sequences", "pg_loss", "kl", "entropy", "clipped", "clipped_dual", "ratio", "log_ratio_abs",
             "rollout_abs_diff", "rollout_kl", "tis_weight", "tis_capped")
"""Sums that :func:`grpo_loss` returns per micro-batch; token sums except ``sequences``. The last four
are zero unless rollout log-probs are given (recomputed old log-probs)."""

MISMATCH_KEYS = ("rollout_logprob_abs_diff", "rollout_kl", "tis_weight_mean", "tis_capped_frac")
"""Keys of :func:`finalize_stats` that describe the engine/trainer mismatch (meaningful only when the
old log-probs were recomputed)."""


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights ``min(exp(log π_old − log μ), cap)`` per token, detached.

    Args:
        old_logprobs: ``[N, T]`` the trainer's (recomputed) old-policy log-probs.
        rollout_logprobs: ``[N, T]`` the rollout engine's log-probs of the same tokens.
        cap: C > 0; weights above it are set to it (bounded variance).

    Returns:
        ``[N, T]`` weights in ``(0, cap]`` (the log-ratio is clamped to [−20, 20] first, like ρ's).
    """
    delta = torch.clamp(old_logprobs.detach() - rollout_logprobs.detach().to(old_logprobs.dtype), -20.0, 20.0)
    return torch.clamp(torch.exp(delta), max=float(cap))


@dataclass(frozen=True)
class LossNormalizer:
    """Denominators of the step's loss: response tokens and non-empty sequences over all ranks."""

    tokens: float
    sequences: float

    @classmethod
    def from_masks(cls, masks: list[torch.Tensor], dp_group=None, device=None) -> "LossNormalizer":
        """Count the ``[N, T]`` masks of this rank's micro-batches and sum the counts over ``dp_group``
        (the counts live on ``device``, the collective's device)."""
        dev = device or (masks[0].device if masks else torch.device("cpu"))
        counts = torch.zeros(2, dtype=torch.float64, device=dev)
        for m in masks:
            m = m.to(dev)
            counts[0] += m.sum()
            counts[1] += (m.sum(-1) > 0).sum()
        if dp_group is not None:
            import torch.distributed as dist

            if dist.get_world_size(dp_group) > 1:
                dist.all_reduce(counts, group=dp_group)
        return cls(tokens=float(counts[0]), sequences=float(counts[1]))


def policy_gradient_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          cfg: GrpoLossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate per token.

    Args:
        logprobs: ``[N, T]`` current log-probs (differentiable).
        old_logprobs: ``[N, T]`` old-policy log-probs.
        advantages: ``[N]`` or ``[N, T]``.
        cfg: clip ranges.

    Returns:
        ``(pg [N, T], ratio [N, T], clipped [N, T] bool, dual_clipped [N, T] bool)``: ``clipped`` where the
        ε-clip changed the loss (its gradient is zero there), ``dual_clipped`` where the dual clip did.
    """
    adv = advantages if advantages.dim() == logprobs.dim() else advantages.unsqueeze(-1)
    adv = adv.to(logprobs.dtype).detach()
    log_ratio = torch.clamp(logprobs - old_logprobs.to(logprobs.dtype), -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    pg = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    dual = torch.zeros_like(was_clipped)
    if cfg.dual_clip_c is not None:
        bound = -adv * cfg.dual_clip_c
        negative = adv < 0
        dual = negative & (pg > bound)
        pg = torch.where(negative, torch.minimum(pg, bound), pg)
    return pg, ratio, was_clipped, dual


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate of ``π`` from ``π_ref`` on tokens sampled from ``π`` (see module docstring)."""
    d = logprobs - ref_logprobs.to(logprobs.dtype)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "low_var_kl":
        neg = torch.clamp(-d, -20.0, 20.0)
        return torch.clamp(torch.exp(neg) - neg - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_type must be low_var_kl, k1 or k2, got {kind!r}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, norm: LossNormalizer) -> torch.Tensor:
    """Sum of ``values [N, T]`` over ``mask`` normalised for the whole step (see module docstring)."""
    m = mask.to(values.dtype)
    v = torch.where(m > 0, values, torch.zeros_like(values))  # no NaN from padding leaks through 0 × inf
    if mode == "token-mean":
        return (v * m).sum() / max(norm.tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = (v * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(norm.sequences, 1.0)
    raise ValueError(f"loss_agg must be token-mean or seq-mean-token-mean, got {mode!r}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GrpoLossConfig,
    norm: LossNormalizer,
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the step's GRPO loss, and its metric sums.

    Args:
        logprobs, old_logprobs: ``[N, T]`` (``logprobs`` differentiable).
        advantages: ``[N]`` (0 for padding rows).
        mask: ``[N, T]`` 1 on response tokens.
        cfg: the objective.
        norm: the step's denominators.
        ref_logprobs: ``[N, T]`` of the reference policy (needed when ``cfg.kl_coef > 0``).
        entropy: ``[N, T]`` entropy of the current policy (differentiable; needed when
            ``cfg.entropy_coef > 0``, optional otherwise, for the metric).
        rollout_logprobs: ``[N, T]`` the rollout engine's log-probs when ``old_logprobs`` were
            recomputed: the mismatch sums, and the TIS weights when ``cfg.tis_imp_ratio_cap`` is set
            (which then needs them).

    Returns:
        ``(loss, sums)``: the scalar loss (summing these over every micro-batch of every rank gives
        ``L``) and detached float64 sums keyed by :data:`STAT_KEYS` (token sums over the mask).
    """
    if not (logprobs.shape == old_logprobs.shape == mask.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [N, T] shape")
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference policy's log-probs)")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs the policy's entropy")
    if cfg.tis_imp_ratio_cap is not None and rollout_logprobs is None:
        raise ValueError("tis_imp_ratio_cap needs rollout_logprobs (the engine's log-probs)")
    pg, ratio, clipped, dual = policy_gradient_terms(logprobs, old_logprobs, advantages, cfg)
    delta = tis = None
    if rollout_logprobs is not None:
        delta = torch.clamp(old_logprobs.detach().to(torch.float64) - rollout_logprobs.to(torch.float64), -20.0, 20.0)
        if cfg.tis_imp_ratio_cap is not None:
            tis = truncated_is_weights(old_logprobs, rollout_logprobs, cfg.tis_imp_ratio_cap)
            pg = pg * tis.to(pg.dtype)
    total = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_type)
        if cfg.kl_coef > 0:
            total = total + cfg.kl_coef * kl
    if entropy is not None and cfg.entropy_coef > 0:
        total = total - cfg.entropy_coef * entropy
    loss = aggregate(total, mask, cfg.loss_agg, norm)

    m = (mask > 0)

    def tsum(x):
        if x is None:
            return torch.zeros((), dtype=torch.float64, device=mask.device)
        x = x.detach().to(torch.float64)
        return torch.where(m, x, torch.zeros_like(x)).sum()

    sums = {
        "tokens": m.sum().to(torch.float64),
        "sequences": (m.sum(-1) > 0).sum().to(torch.float64),
        "pg_loss": tsum(pg),
        "kl": tsum(kl),
        "entropy": tsum(entropy),
        "clipped": tsum(clipped.to(torch.float64)),
        "clipped_dual": tsum(dual.to(torch.float64)),
        "ratio": tsum(ratio),
        "log_ratio_abs": tsum((logprobs - old_logprobs).abs()),
        "rollout_abs_diff": tsum(None if delta is None else delta.abs()),
        "rollout_kl": tsum(None if delta is None else torch.expm1(delta) - delta),
        "tis_weight": tsum(tis),
        "tis_capped": tsum(None if tis is None else (delta > math.log(cfg.tis_imp_ratio_cap)).to(torch.float64)),
    }
    return loss, sums


def finalize_stats(sums: dict[str, float]) -> dict[str, float]:
    """Token means of the summed :data:`STAT_KEYS` (``clip_frac`` etc.), for logging."""
    n = max(sums.get("tokens", 0.0), 1.0)
    return {
        "pg_loss": sums.get("pg_loss", 0.0) / n,
        "kl": sums.get("kl", 0.0) / n,
        "entropy": sums.get("entropy", 0.0) / n,
        "clip_frac": sums.get("clipped", 0.0) / n,
        "clip_frac_dual": sums.get("clipped_dual", 0.0) / n,
        "ratio_mean": sums.get("ratio", 0.0) / n,
        "abs_log_ratio": sums.get("log_ratio_abs", 0.0) / n,
        "rollout_logprob_abs_diff": sums.get("rollout_abs_diff", 0.0) / n,
        "rollout_kl": sums.get("rollout_kl", 0.0) / n,
        "tis_weight_mean": sums.get("tis_weight", 0.0) / n,
        "tis_capped_frac": sums.get("tis_capped", 0.0) / n,
        "response_tokens": sums.get("tokens", 0.0),
        "sequences": sums.get("sequences", 0.0),
    }
