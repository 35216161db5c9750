"""Token log-probabilities and entropy from vocab-parallel logits, without gathering the vocabulary.

Under TP each rank holds logits ``z`` for its vocabulary slice ``[start, start + V/TP)``. With the
row maximum ``m`` (all-reduced MAX, no gradient needed: log-softmax is shift invariant) and the
partition function ``Z = Σ_r Σ_{v∈r} exp(z_v − m)`` (all-reduced SUM),

    log p(a) = z_a − m − log Z,          H = log Z + m − Σ_v p_v z_v.

Sums across TP go through Megatron's ``reduce_from_tensor_model_parallel_region`` (forward all-reduce,
backward identity: every TP rank holds the same replicated loss), so autograd gives each rank the
exact gradient of its slice: ``∂ log p(a)/∂z_v = 1[v = a] − p_v``. Only ``[tokens]``-sized tensors
cross the TP group, never ``[tokens, V]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_logprobs", "vocab_parallel_entropy", "shift_for_next_token"]


def _reduce(x: torch.Tensor, tp_group) -> torch.Tensor:
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=tp_group)


def _shifted(logits: torch.Tensor, temperature: float, tp_group):
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    m = z.detach().max(dim=-1, keepdim=True).values
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    e = torch.exp(z - m)
    log_z = torch.log(_reduce(e.sum(dim=-1), tp_group))
    return z, m.squeeze(-1), e, log_z


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    tp_rank: int = 0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log softmax(logits / T)[target]`` for every position, from this rank's vocabulary slice.

    Args:
        logits: ``[..., V/TP]`` (any float dtype; computed in fp32), rank ``tp_rank``'s slice.
        targets: ``[...]`` global token ids.
        tp_group: the tensor-parallel group (None or size 1: plain log-softmax).
        tp_rank: this rank's index in ``tp_group``.
        temperature: the ``T`` of the distribution (the one that sampled, for behaviour ratios).

    Returns:
        ``[...]`` float32 log-probs, identical on every TP rank.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [...]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z, m, _, log_z = _shifted(logits, temperature, tp_group)
    v_local = z.shape[-1]
    start = tp_rank * v_local
    local = targets - start
    in_range = (local >= 0) & (local < v_local)
    picked = torch.gather(z, -1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    z_target = _reduce(torch.where(in_range, picked, torch.zeros_like(picked)), tp_group)
    return z_target - m - log_z


def vocab_parallel_entropy(logits: torch.Tensor, *, tp_group=None, temperature: float = 1.0) -> torch.Tensor:
    """Entropy ``H = −Σ_v p_v log p_v`` of ``softmax(logits / T)`` per position: ``[..., V/TP] → [...]``."""
    z, m, e, log_z = _shifted(logits, temperature, tp_group)
    # H = log Z + m − (Σ_v e_v z_v) / Z with the *unnormalised* sum reduced over TP: every cross-rank
    # dependency then passes through replicated scalars, where the reduction's identity backward is
    # exact. (Reducing Σ_v p_v z_v instead drops the other ranks' ∂p_u/∂Z terms from each rank's
    # gradient.)
    return log_z + m - _reduce((e * z).sum(dim=-1), tp_group) / torch.exp(log_z)


def shift_for_next_token(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Labels for next-token prediction: ``labels[:, t] = tokens[:, t + 1]``, last column ``pad_id``."""
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    return labels
