"""HF ``config.json`` ↔ our model description, for Qwen2/Qwen2.5, Qwen3 (dense) and Llama.

:class:`GPTDimensions` is the small set of sizes and flags that both the tensor mapping
(:mod:`.hf_mapping`) and the checks between a checkpoint and a model need. It is built from a
:class:`~megatron_cropi.model.config.ModelConfig`, from a live Megatron ``GPTModel``, or from an HF
``config.json``, so any two can be compared field by field. Supported: ``Qwen2ForCausalLM`` (QKV bias),
``Qwen3ForCausalLM`` (no bias; RMSNorm over each query and key head, Megatron's ``qk_layernorm``; its
``head_dim`` is not ``hidden/heads``) and ``LlamaForCausalLM`` (no bias), all with SwiGLU, RMSNorm and
plain RoPE; anything else (RoPE scaling, sliding-window attention, attention biases on Qwen3/Llama,
other activations) is rejected with the key that asks for it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from megatron_cropi.model.config import ModelConfig

__all__ = [
    "HFCheckpointError",
    "SUPPORTED_ARCHITECTURES",
    "IGNORED_HF_TENSORS",
    "GPTDimensions",
    "model_config_from_hf_config",
    "hf_config_from_dimensions",
]

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
# HF tensors that carry nothing a GPTModel holds (old Llama checkpoints store RoPE's inv_freq).
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class HFCheckpointError(ValueError):
    """An HF checkpoint cannot be converted; the message names the file, tensor or config key."""


@dataclass(frozen=True)
class GPTDimensions:
    """Everything the mapping needs to know about a Qwen2/Qwen3/Llama model.

    Built from a :class:`ModelConfig` (:meth:`from_model_config`), from a Megatron ``GPTModel``
    (:meth:`from_model`) or from an HF ``config.json`` (:meth:`from_hf_config`), so the three can be
    compared field by field.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    """Query heads ``nq``."""
    num_groups: int
    """Key/value heads ``ng`` (GQA groups)."""
    head_dim: int
    """``d``; Megatron's ``kv_channels`` (may differ from ``hidden_size // num_heads``)."""
    ffn_hidden_size: int
    vocab_size: int
    tied: bool
    """``lm_head`` shares the embedding (``tie_word_embeddings``)."""
    qkv_bias: bool
    """Bias on the Q/K/V projections (Qwen2: yes; Qwen3, Llama: no)."""
    qk_norm: bool = False
    """RMSNorm ``[d]`` over every query and key head before RoPE (Qwen3; Megatron's ``qk_layernorm``)."""
    norm_epsilon: float | None = None
    rotary_base: float | None = None

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "GPTDimensions":
        t = cfg.transformer
        _require_swiglu_rmsnorm(t.get("gated_linear_unit"), t.get("normalization"), cfg.activation,
                                t.get("add_bias_linear"), "ModelConfig")
        return cls(
            num_layers=t["num_layers"], hidden_size=t["hidden_size"], num_heads=t["num_attention_heads"],
            num_groups=cfg.num_query_groups,
            head_dim=t.get("kv_channels") or t["hidden_size"] // t["num_attention_heads"],
            ffn_hidden_size=cfg.ffn_hidden_size, vocab_size=cfg.vocab_size, tied=bool(cfg.tie_word_embeddings),
            qkv_bias=bool(t.get("add_qkv_bias")), qk_norm=bool(t.get("qk_layernorm")),
            norm_epsilon=t.get("layernorm_epsilon"), rotary_base=float(cfg.rotary_base),
        )

    @classmethod
    def from_model(cls, model) -> "GPTDimensions":
        """From a Megatron ``GPTModel`` (any TP/PP stage: its ``config`` holds the global sizes)."""
        c = model.config
        act = getattr(c.activation_func, "__name__", repr(c.activation_func))
        _require_swiglu_rmsnorm(c.gated_linear_unit, c.normalization, act, c.add_bias_linear, "model.config")
        base = getattr(model, "rotary_base", None)
        return cls(
            num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
            num_groups=c.num_query_groups or c.num_attention_heads, head_dim=c.kv_channels,
            ffn_hidden_size=c.ffn_hidden_size, vocab_size=model.vocab_size,
            tied=bool(model.share_embeddings_and_output_weights), qkv_bias=bool(c.add_qkv_bias),
            qk_norm=bool(c.qk_layernorm), norm_epsilon=c.layernorm_epsilon, rotary_base=None if base is None else float(base),
        )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> "GPTDimensions":
        """From an HF ``config.json`` mapping; raises :class:`HFCheckpointError` naming the key."""
        arch = _architecture(hf, source)

        def get(key, default=None):
            value = hf.get(key, default)
            if value is None:
                raise HFCheckpointError(f"{source}: required key {key!r} is missing")
            return value

        if hf.get("hidden_act", "silu") != "silu":
            raise HFCheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported; expected 'silu'")
        if hf.get("use_sliding_window"):
            raise HFCheckpointError(f"{source}: use_sliding_window=true is not supported (Megatron attends to "
                                    "the full causal context); expected false")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            key = "rope_parameters.rope_type" if rope.get("rope_type") else "rope_scaling"
            raise HFCheckpointError(f"{source}: {key} {rope_type!r} is not supported; expected 'default' RoPE")
        # transformers < 5 writes rope_theta at the top level, transformers >= 5 inside rope_parameters
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
            # Qwen3's attention_bias would also put a bias on o_proj, which add_bias_linear=False has not
            for key in ("attention_bias", "mlp_bias"):
                if hf.get(key):
                    name = "Llama" if arch == "LlamaForCausalLM" else "Qwen3"
                    raise HFCheckpointError(f"{source}: {key}=true is not supported for {name}; expected false")
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            num_layers=int(get("num_hidden_layers")), hidden_size=hidden, num_heads=heads,
            num_groups=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(get("intermediate_size")), vocab_size=int(get("vocab_size")),
            tied=bool(hf.get("tie_word_embeddings", False)), qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM", norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), rotary_base=float(theta),
        )

    def differences(self, other: "GPTDimensions") -> list[str]:
        """``"field: a vs b"`` for every field that differs (floats to relative 1e-9; None matches all)."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                continue
            same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) else a == b
            if not same:
                out.append(f"{f.name}: {a!r} vs {b!r}")
        return out

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_groups) * self.head_dim


def _require_swiglu_rmsnorm(gated, norm, activation, bias_linear, where: str) -> None:
    if not (gated and norm == "RMSNorm" and activation == "silu" and not bias_linear):
        raise HFCheckpointError(
            f"{where}: HF Qwen2/Qwen3/Llama conversion needs gated_linear_unit=True, normalization='RMSNorm', "
            f"activation silu and add_bias_linear=False; got gated_linear_unit={gated!r}, "
            f"normalization={norm!r}, activation={activation!r}, add_bias_linear={bias_linear!r}"
        )


def _architecture(hf: Mapping[str, Any], source: str) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
        raise HFCheckpointError(f"{source}: no 'architectures' and model_type {hf.get('model_type')!r} is not "
                                f"supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise HFCheckpointError(f"{source}: architecture {arch!r} is not supported; "
                                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    return arch


def model_config_from_hf_config(
    hf: Mapping[str, Any],
    *,
    params_dtype: str | None = None,
    layer_spec: str = "auto",
    max_sequence_length: int | None = None,
    source: str = "config.json",
) -> ModelConfig:
    """A ``custom`` :class:`ModelConfig` equal to an HF Qwen2/Qwen3/Llama ``config.json``.

    Args:
        hf: the parsed ``config.json``.
        params_dtype: default: the checkpoint's ``dtype``/``torch_dtype`` when it is one of
            float32/bfloat16/float16, else float32.
        layer_spec: passed through (``auto``/``local``/``te``).
        max_sequence_length: default: ``max_position_embeddings``.
    """
    dims = GPTDimensions.from_hf_config(hf, source=source)
    if params_dtype is None:
        params_dtype = _DTYPE_NAMES.get(str(hf.get("dtype") or hf.get("torch_dtype") or ""), "float32")
    transformer = dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden_size, ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_heads, num_query_groups=dims.num_groups,
        layernorm_epsilon=dims.norm_epsilon, add_qkv_bias=dims.qkv_bias, add_bias_linear=False,
        gated_linear_unit=True, normalization="RMSNorm",
    )
    if dims.qk_norm:
        transformer["qk_layernorm"] = True
    if dims.head_dim != dims.hidden_size // dims.num_heads:
        transformer["kv_channels"] = dims.head_dim
    return ModelConfig(
        preset="custom", vocab_size=dims.vocab_size,
        max_sequence_length=int(max_sequence_length or hf.get("max_position_embeddings") or 4096),
        tie_word_embeddings=dims.tied, rotary_base=dims.rotary_base, activation="silu",
        params_dtype=params_dtype, layer_spec=layer_spec, transformer=transformer,
    )


def hf_config_from_dimensions(
    dims: GPTDimensions, *, dtype: torch.dtype, max_position_embeddings: int, base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An HF ``config.json`` for ``dims``: Qwen3 with q/k norms, Qwen2 with a QKV bias, Llama otherwise.

    ``base`` (e.g. the imported checkpoint's config) keeps keys we do not own (token ids, ...).
    Both ``rope_theta`` (transformers < 5, vLLM) and ``rope_parameters`` (transformers ≥ 5) are written.
    """
    if dims.qk_norm and dims.qkv_bias:
        raise HFCheckpointError("q/k norms together with a QKV bias match no supported HF architecture "
                                "(Qwen3 has no QKV bias, Qwen2 no q/k norms)")
    arch = "Qwen3ForCausalLM" if dims.qk_norm else "Qwen2ForCausalLM" if dims.qkv_bias else "LlamaForCausalLM"
    dtype_name = str(dtype).removeprefix("torch.")
    out = {k: v for k, v in (base or {}).items() if k not in ("rope_scaling", "auto_map", "quantization_config")}
    out.update(
        architectures=[arch], model_type=SUPPORTED_ARCHITECTURES[arch], vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size, intermediate_size=dims.ffn_hidden_size, num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_groups, head_dim=dims.head_dim,
        hidden_act="silu", max_position_embeddings=int(max_position_embeddings),
        rms_norm_eps=dims.norm_epsilon if dims.norm_epsilon is not None else 1e-6,
        rope_theta=dims.rotary_base if dims.rotary_base is not None else 10000.0,
        tie_word_embeddings=dims.tied, attention_dropout=0.0, dtype=dtype_name, torch_dtype=dtype_name,
    )
    out["rope_parameters"] = {"rope_theta": out["rope_theta"], "rope_type": "default"}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    elif arch == "Qwen3ForCausalLM":
        out.update(attention_bias=False, use_sliding_window=False)
    else:
        out.update(use_sliding_window=False)
    return out
