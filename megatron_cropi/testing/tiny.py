"""Tiny models and batches for tests and benchmarks, identical under every TP/PP layout."""

from __future__ import annotations

import torch

from megatron_cropi.config.loader import from_dict
from megatron_cropi.model.config import ModelConfig
from megatron_cropi.model.params import init_params_by_global_name
from megatron_cropi.model.provider import build_gpt_model
from megatron_cropi.parallel import ParallelGroups

__all__ = ["tiny_model_config", "build_tiny_model", "random_lm_batches"]


def tiny_model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A :class:`ModelConfig` of a named tiny size; ``transformer`` overrides merge over the preset."""
    return from_dict(ModelConfig, {"preset": preset, **overrides})


def build_tiny_model(cfg: ModelConfig, groups: ParallelGroups, *, seed: int = 0, std: float = 0.05, **kwargs):
    """:func:`build_gpt_model` with parameters drawn from ``(seed, global name)``: every layout holds
    the same global model."""
    model = build_gpt_model(cfg, groups, **kwargs)
    init_params_by_global_name(model, groups, seed=seed, std=std)
    return model


def random_lm_batches(num: int, batch: int, seq: int, vocab: int, *, seed: int = 0) -> list[dict]:
    """``num`` micro-batches of random ``tokens``/``labels`` ``[batch, seq]`` and a loss mask."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = (torch.rand(batch, seq, generator=gen) > 0.2).float()
        out.append(dict(tokens=tokens, labels=labels, loss_mask=mask))
    return out
