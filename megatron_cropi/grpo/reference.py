"""Forward-only log-prob passes, and the frozen reference policy of the KL penalty.

:func:`forward_logprobs` runs a model stage over packed micro-batches through Megatron's schedule with
``forward_only=True`` (pipeline parallelism stays Megatron's) and returns, on the last stage, the
log-probs ``log softmax(z / T)[label]`` of every position (vocab-parallel, never gathered). The trainer
uses it for the reference policy and, when configured, to recompute the old policy's log-probs.

:class:`ReferencePolicy` is a second ``GPTModel`` with the policy's layout holding a frozen copy of
the policy's weights at the start of training. It is built only when the KL coefficient is positive.
"""

from __future__ import annotations

import torch

from megatron_cropi.model.config import ModelConfig
from megatron_cropi.model.logprobs import DEFAULT_CHUNK_TOKENS, vocab_parallel_logprobs
from megatron_cropi.model.schedule import causal_attention_mask, forward_backward
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.popi.batch import PopiMicrobatch

__all__ = ["forward_logprobs", "ReferencePolicy", "unwrap_model"]


def unwrap_model(model):
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def forward_logprobs(model, groups: ParallelGroups, microbatches: list[PopiMicrobatch], *,
                     temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[torch.Tensor]:
    """``[N, S]`` float32 log-probs of ``mb.labels`` per micro-batch on the last stage; ``[]`` elsewhere.

    Every rank of a pipeline group passes the same micro-batches (all of one shape under PP > 1).
    """
    if not microbatches:
        return []
    seq, rows = max(mb.tokens.shape[1] for mb in microbatches), microbatches[0].tokens.shape[0]
    device = groups.device
    # one shape under PP; at PP = 1 micro-batches may have their own lengths (length-aware packing)
    masks = {n: causal_attention_mask(n, device) for n in {mb.tokens.shape[1] for mb in microbatches}}
    was_training = model.training
    model.eval()

    def forward_step(data_iterator, m):
        mb = next(data_iterator).to(device)
        out = m(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=masks[mb.tokens.shape[1]])

        def loss_func(logits):
            logp = vocab_parallel_logprobs(logits, mb.labels, tp_group=groups.tp, tp_rank=groups.tp_rank,
                                           temperature=temperature, chunk_tokens=chunk_tokens)
            return torch.zeros((), device=device), {"logprobs": logp.detach().float()}

        return out, loss_func

    try:
        reduced = forward_backward(model, groups, forward_step_func=forward_step, data_iterator=iter(microbatches),
                                   num_microbatches=len(microbatches), seq_length=seq, micro_batch_size=rows,
                                   forward_only=True)
    finally:
        model.train(was_training)
    return [r["logprobs"] for r in reduced] if groups.is_last_stage else []


class ReferencePolicy:
    """A frozen copy of the policy (same layout), the ``π_ref`` of the KL penalty.

    Args:
        model_cfg: the policy's model configuration.
        groups: this rank's process groups.
        policy: the policy model (bare or wrapped) whose current weights are copied.
    """

    def __init__(self, model_cfg: ModelConfig, groups: ParallelGroups, policy):
        from megatron_cropi.model.provider import build_gpt_model

        self.groups = groups
        self.model = build_gpt_model(model_cfg, groups)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.reset_from(policy)

    @torch.no_grad()
    def reset_from(self, policy) -> None:
        """Copy the policy's current weights (e.g. at the start of a new curriculum stage)."""
        src = dict(unwrap_model(policy).named_parameters())
        for name, p in self.model.named_parameters():
            p.copy_(src[name].detach())

    def logprobs(self, microbatches: list[PopiMicrobatch], *, temperature: float = 1.0,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[torch.Tensor]:
        """:func:`forward_logprobs` of the reference model."""
        return forward_logprobs(self.model, self.groups, microbatches, temperature=temperature,
                                chunk_tokens=chunk_tokens)
