"""Build the policy: a Megatron-Core ``GPTModel`` of the Qwen2 or Qwen3 (dense) family on this rank's
TP/PP shard.

``build_gpt_model(cfg, groups)`` is the model provider every step uses (capture, sampler, GRPO,
checkpoint conversion). The layer spec comes from Megatron's own spec functions: Transformer Engine's
when it is importable (GPU images), megatron-core's local spec otherwise (CPU).
"""

from __future__ import annotations

import importlib.util

import torch

from megatron_cropi.model.config import ModelConfig
from megatron_cropi.parallel import ParallelGroups

__all__ = ["build_transformer_config", "build_layer_spec", "build_gpt_model", "resolve_layer_spec", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports (it needs CUDA)."""
    if importlib.util.find_spec("transformer_engine") is None or not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # the meta package without its CUDA extension raises RuntimeError
        return False
    return True


def resolve_layer_spec(cfg: ModelConfig) -> str:
    """``"te"`` or ``"local"`` for ``cfg.layer_spec`` on this machine; ``te`` needs TE + CUDA."""
    if cfg.layer_spec == "auto":
        return "te" if transformer_engine_available() else "local"
    if cfg.layer_spec == "te" and not transformer_engine_available():
        raise RuntimeError(
            "model.layer_spec is 'te' but Transformer Engine is not usable here (needs CUDA and "
            "`pip install megatron_cropi[te]`); use layer_spec: local or auto"
        )
    return cfg.layer_spec


def build_transformer_config(cfg: ModelConfig, groups: ParallelGroups):
    """Megatron ``TransformerConfig`` for ``cfg`` at this run's TP/PP sizes.

    Raises:
        ValueError: the model cannot be split this way (heads, groups, vocab, layers), naming the field.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    errors = cfg.layout_errors(groups.tp_size, groups.pp_size)
    if errors:
        raise ValueError("; ".join(errors))
    dtype = DTYPES[cfg.params_dtype]
    kwargs = dict(cfg.transformer)
    # megatron-core's default scope "full" is deprecated (warns) and means the empty list: say it the current way.
    kwargs.setdefault("cuda_graph_scope", [])
    kwargs.update(
        activation_func=torch.nn.functional.silu if cfg.activation == "silu" else torch.nn.functional.gelu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        use_cpu_initialization=kwargs.get("use_cpu_initialization", groups.device.type == "cpu"),
    )
    return TransformerConfig(**kwargs)


def build_layer_spec(cfg: ModelConfig, kind: str | None = None):
    """The Megatron layer ``ModuleSpec``: ``"te"`` or ``"local"`` (default: :func:`resolve_layer_spec`)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    kind = kind or resolve_layer_spec(cfg)
    # Qwen3: both specs build q_layernorm/k_layernorm as the layer's norm class over head_dim (local:
    # torch RMSNorm; TE: TENorm); megatron's finalize_model_grads sums their gradients over TP.
    qk_norm = bool(cfg.transformer.get("qk_layernorm", False))
    if kind == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    return get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization=cfg.transformer["normalization"])


def build_gpt_model(cfg: ModelConfig, groups: ParallelGroups, *, layer_spec=None, transformer_config=None):
    """This rank's ``GPTModel`` stage, on ``groups.device``.

    Args:
        cfg: the model configuration.
        groups: this run's process groups (TP/PP sizes, stage of this rank).
        layer_spec: a Megatron ``ModuleSpec`` overriding :func:`build_layer_spec` (capture specs).
        transformer_config: a prebuilt ``TransformerConfig`` (default: :func:`build_transformer_config`).

    Returns:
        ``GPTModel`` with ``pre_process``/``post_process`` set for this pipeline stage; logits are
        vocab-parallel (``parallel_output=True``).
    """
    from megatron.core.models.gpt import GPTModel

    tcfg = transformer_config or build_transformer_config(cfg, groups)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec or build_layer_spec(cfg),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base,
        pg_collection=groups.pg_collection,
    )
    return model.to(groups.device)
