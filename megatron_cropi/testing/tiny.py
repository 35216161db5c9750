"""Tiny models and batches for tests and benchmarks, identical under every TP/PP layout."""

from __future__ import annotations

import torch

from megatron_cropi.config.loader import from_dict
from megatron_cropi.model.config import ModelConfig
from megatron_cropi.model.params import init_params_by_global_name
from megatron_cropi.model.provider import build_gpt_model, build_model_chunks
from megatron_cropi.parallel import ParallelGroups

__all__ = ["tiny_model_config", "build_tiny_model", "build_tiny_chunks", "random_lm_batches"]


def tiny_model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A :class:`ModelConfig` of a named tiny size; ``transformer`` overrides merge over the preset."""
    return from_dict(ModelConfig, {"preset": preset, **overrides})


def build_tiny_model(cfg: ModelConfig, groups: ParallelGroups, *, seed: int = 0, std: float = 0.05, **kwargs):
    """:func:`build_gpt_model` with parameters drawn from ``(seed, global name)``: every layout holds
    the same global model."""
    model = build_gpt_model(cfg, groups, **kwargs)
    init_params_by_global_name(model, groups, seed=seed, std=std)
    return model


def build_tiny_chunks(cfg: ModelConfig, groups: ParallelGroups, *, seed: int = 0, std: float = 0.05) -> list:
    """:func:`build_model_chunks` (the interleaved schedule's chunks, or the one stage) with parameters
    drawn from ``(seed, global name)``: the same global model as :func:`build_tiny_model` builds."""
    chunks = build_model_chunks(cfg, groups)
    for chunk in chunks:
        init_params_by_global_name(chunk, groups, seed=seed, std=std)
    return chunks


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


def tiny_curriculum_config(output_dir: str, **overrides) -> dict:
    """A complete ``cropi run`` config (as a dict) that finishes in seconds: warm-up, rollouts, 2 stages.

    Easy families (cmp, add1, max, rev; target cmp) so that a 60-step warm-up already gives groups with
    mixed rewards. ``overrides`` are dotted keys, e.g. ``{"selection.ratio": 0.5}``.
    """
    cfg = {
        "run": {"output_dir": str(output_dir), "seed": 5, "num_threads": 1},
        "model": {"preset": "cpu-default"},
        "data": {"kind": "synthetic", "synthetic": {"per_family": 12, "val_size": 12, "test_size": 12,
                                                    "check_per_family": 4, "families": ["cmp", "add1", "max", "rev"],
                                                    "target": "cmp"}},
        "rollout": {"engine": "native", "n": 4, "max_tokens": 6, "progress": False, "batch_prompts": 16},
        "projection": {"kind": "sjlt", "k": 512, "keep_ratio": 0.5},
        "scoring": {"prompts_per_microbatch": 4, "microbatches_per_call": 1},
        "selection": {"policy": "cropi", "ratio": 0.25},
        "grpo": {"prompts_per_step": 4, "micro_batch_prompts": 4, "loss": {"kl_coef": 0.0, "entropy_coef": 0.0},
                 "optim": {"lr": 3.0e-4}, "checkpoint": {"save_interval": 2}},
        "curriculum": {"stages": 2, "steps_per_stage": 3, "pool_samples": 4, "target_samples": 4,
                       "warmup": {"enabled": True, "max_steps": 60, "eval_every": 60, "stop_at_greedy": 1.0},
                       "eval": {"every": 3, "samples": 2, "check": False}, "probe_prompts": 0},
    }
    for dotted, value in overrides.items():
        node = cfg
        *path, leaf = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg
