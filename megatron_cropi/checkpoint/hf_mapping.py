"""Pure name and layout mapping between HF Qwen2/Qwen3/Llama tensors and a *global* Megatron ``GPTModel``.

"Global" means the names and shapes of the unsharded TP=1/PP=1 model built by
:func:`megatron_cropi.model.provider.build_gpt_model`; TP/PP shards are cut from these tensors with
:func:`megatron_cropi.model.params.param_layouts` (see :mod:`megatron_cropi.checkpoint.hf`).

Why our own converter and not mbridge: mbridge 0.15 (the version installable next to megatron-core
0.16 on Python 3.11) hard-codes the Transformer Engine layer spec, calls ``.cuda()`` when building,
and reads ``hf_config.rope_theta`` which transformers 5 moved into ``rope_parameters``; using it on
CPU means patching its internals (layer spec, model provider, rope config). The mapping itself is small:

==========================================================  =========================================
Megatron (layer ``i``)                                      HF (``model.layers.i.`` prefix omitted)
==========================================================  =========================================
``embedding.word_embeddings.weight``  ``[V, h]``            ``model.embed_tokens.weight``
``decoder.layers.i.input_layernorm.weight``  ``[h]``        ``input_layernorm.weight``
  (TE spec: ``self_attention.linear_qkv.layer_norm_weight``)
``decoder.layers.i.self_attention.linear_qkv.weight``       ``self_attn.{q,k,v}_proj.weight``,
  ``[ng·(nq/ng + 2)·d, h]``, rows ``[ng, nq/ng + 2, d]``    interleaved per query group (below)
``decoder.layers.i.self_attention.linear_qkv.bias``         ``self_attn.{q,k,v}_proj.bias`` (Qwen2)
``decoder.layers.i.self_attention.linear_proj.weight``      ``self_attn.o_proj.weight`` ``[h, nq·d]``
``decoder.layers.i.self_attention.q_layernorm.weight``      ``self_attn.q_norm.weight`` ``[d]`` (Qwen3)
``decoder.layers.i.self_attention.k_layernorm.weight``      ``self_attn.k_norm.weight`` ``[d]`` (Qwen3)
``decoder.layers.i.pre_mlp_layernorm.weight``  ``[h]``      ``post_attention_layernorm.weight``
  (TE spec: ``mlp.linear_fc1.layer_norm_weight``)
``decoder.layers.i.mlp.linear_fc1.weight``  ``[2f, h]``     ``cat(mlp.gate_proj, mlp.up_proj)`` rows
``decoder.layers.i.mlp.linear_fc2.weight``  ``[h, f]``      ``mlp.down_proj.weight``
``decoder.final_layernorm.weight``  ``[h]``                 ``model.norm.weight``
``output_layer.weight``  ``[V, h]`` (untied only)           ``lm_head.weight``
==========================================================  =========================================

QKV interleave: with ``nq`` query heads, ``ng`` KV groups and head size ``d``, Megatron's fused QKV
weight viewed as ``[ng, nq/ng + 2, d, h]`` holds, for group ``g``, the query heads
``g·nq/ng … (g+1)·nq/ng − 1``, then key head ``g``, then value head ``g`` (HF's ``repeat_kv`` pairs
query head ``j`` with KV head ``j // (nq/ng)``, the same grouping). Splitting that tensor evenly over
TP ranks gives each rank whole groups, which is why the global tensor is all the loader needs.

Every function here is pure (tensors in, tensors out) and bit-exact in both directions; the sizes
come from :class:`~megatron_cropi.checkpoint.hf_config.GPTDimensions`.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from megatron_cropi.checkpoint.hf_config import IGNORED_HF_TENSORS, GPTDimensions, HFCheckpointError
from megatron_cropi.model.config import ModelConfig

__all__ = [
    "megatron_global_shapes",
    "hf_shapes_for",
    "to_megatron_tensor",
    "to_hf_tensors",
    "hf_to_megatron_global",
    "megatron_global_to_hf",
]

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
# Megatron per-layer suffix -> HF per-layer suffix, for the 1:1 tensors (norms under both name sets)
_LAYER_ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
# Per-head norms (Qwen3): one [d] weight shared by every head, replicated over TP ranks.
_QK_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
_GLOBAL_ONE_TO_ONE = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def megatron_global_shapes(dims: GPTDimensions, *, fused_norms: bool = False) -> dict[str, tuple[int, ...]]:
    """Global parameter names and shapes of the TP=1/PP=1 ``GPTModel``.

    Args:
        fused_norms: Transformer Engine spec names (``linear_qkv.layer_norm_weight``,
            ``linear_fc1.layer_norm_weight``) instead of the local spec's separate norms.
    """
    h, d = dims.hidden_size, dims.head_dim
    out: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (dims.vocab_size, h)}
    for i in range(dims.num_layers):
        p = f"decoder.layers.{i}."
        out[p + ("self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight")] = (h,)
        out[p + "self_attention.linear_qkv.weight"] = (dims.qkv_rows, h)
        if dims.qkv_bias:
            out[p + "self_attention.linear_qkv.bias"] = (dims.qkv_rows,)
        if dims.qk_norm:
            for norm in _QK_NORMS:
                out[p + norm] = (d,)
        out[p + "self_attention.linear_proj.weight"] = (h, dims.num_heads * d)
        out[p + ("mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight")] = (h,)
        out[p + "mlp.linear_fc1.weight"] = (2 * dims.ffn_hidden_size, h)
        out[p + "mlp.linear_fc2.weight"] = (h, dims.ffn_hidden_size)
    out["decoder.final_layernorm.weight"] = (h,)
    if not dims.tied:
        out["output_layer.weight"] = (dims.vocab_size, h)
    return out


def hf_shapes_for(global_name: str, dims: GPTDimensions) -> dict[str, tuple[int, ...]]:
    """The HF tensors (name → expected shape) that make up one global Megatron tensor."""
    h, d, f = dims.hidden_size, dims.head_dim, dims.ffn_hidden_size
    if global_name in _GLOBAL_ONE_TO_ONE:
        if global_name == "output_layer.weight" and dims.tied:
            raise HFCheckpointError("output_layer.weight: the model ties its embeddings; it has no output layer")
        shape = (h,) if "layernorm" in global_name else (dims.vocab_size, h)
        return {_GLOBAL_ONE_TO_ONE[global_name]: shape}
    m = _LAYER.fullmatch(global_name)
    if m is None:
        raise HFCheckpointError(f"{global_name}: not a parameter of a Qwen2/Qwen3/Llama GPTModel")
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= dims.num_layers:
        raise HFCheckpointError(f"{global_name}: layer {layer} >= num_layers={dims.num_layers}")
    p = f"model.layers.{layer}."
    if rest in _QK_NORMS and not dims.qk_norm:
        raise HFCheckpointError(f"{global_name}: the model has no q/k norms (qk_layernorm=False)")
    if rest in _LAYER_ONE_TO_ONE:
        shape = {"self_attention.linear_proj.weight": (h, dims.num_heads * d), "mlp.linear_fc2.weight": (h, f),
                 **{norm: (d,) for norm in _QK_NORMS}}
        return {p + _LAYER_ONE_TO_ONE[rest]: shape.get(rest, (h,))}
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        if kind == "bias" and not dims.qkv_bias:
            raise HFCheckpointError(f"{global_name}: the model has no QKV bias (add_qkv_bias=False)")
        tail = (h,) if kind == "weight" else ()
        return {p + f"self_attn.q_proj.{kind}": (dims.num_heads * d, *tail),
                p + f"self_attn.k_proj.{kind}": (dims.num_groups * d, *tail),
                p + f"self_attn.v_proj.{kind}": (dims.num_groups * d, *tail)}
    if rest == "mlp.linear_fc1.weight":
        return {p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h)}
    raise HFCheckpointError(f"{global_name}: not a parameter of a Qwen2/Qwen3/Llama GPTModel")


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise HFCheckpointError(f"{what} tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")


def to_megatron_tensor(global_name: str, hf_tensors: Mapping[str, torch.Tensor], dims: GPTDimensions) -> torch.Tensor:
    """Build one global Megatron tensor from its HF tensors (:func:`hf_shapes_for` names them).

    Raises:
        HFCheckpointError: a needed HF tensor is missing or has the wrong shape (naming it and both shapes).
    """
    expected = hf_shapes_for(global_name, dims)
    for name, shape in expected.items():
        if name not in hf_tensors:
            raise HFCheckpointError(f"HF tensor {name!r} (needed for {global_name}) is missing")
        _check_shape(name, hf_tensors[name], shape, "HF")
    parts = [hf_tensors[n] for n in expected]
    if len(parts) == 1:
        return parts[0]
    if ".linear_fc1." in global_name:  # SwiGLU: Megatron's fc1 output is [gate; up]
        return torch.cat(parts, dim=0)
    q, k, v = parts  # [nq·d, *tail], [ng·d, *tail], [ng·d, *tail]
    ng, per, d = dims.num_groups, dims.num_heads // dims.num_groups, dims.head_dim
    tail = q.shape[1:]
    grouped = torch.cat([q.reshape(ng, per, d, *tail), k.reshape(ng, 1, d, *tail), v.reshape(ng, 1, d, *tail)], dim=1)
    return grouped.reshape(dims.qkv_rows, *tail)


def to_hf_tensors(global_name: str, tensor: torch.Tensor, dims: GPTDimensions) -> dict[str, torch.Tensor]:
    """Split one global Megatron tensor into its HF tensors (contiguous, sharing no storage)."""
    expected = hf_shapes_for(global_name, dims)
    names = list(expected)
    if len(names) == 1:
        _check_shape(global_name, tensor, expected[names[0]], "Megatron")
        return {names[0]: tensor.contiguous()}
    if ".linear_fc1." in global_name:
        _check_shape(global_name, tensor, (2 * dims.ffn_hidden_size, dims.hidden_size), "Megatron")
        gate, up = tensor.chunk(2, dim=0)
        return {names[0]: gate.clone(), names[1]: up.clone()}
    tail = expected[names[0]][1:]
    _check_shape(global_name, tensor, (dims.qkv_rows, *tail), "Megatron")
    ng, per, d = dims.num_groups, dims.num_heads // dims.num_groups, dims.head_dim
    grouped = tensor.reshape(ng, per + 2, d, *tail)
    q = grouped[:, :per].reshape(dims.num_heads * d, *tail)
    k = grouped[:, per].reshape(ng * d, *tail)
    v = grouped[:, per + 1].reshape(ng * d, *tail)
    return {names[0]: q.clone(), names[1]: k.clone(), names[2]: v.clone()}


def _dims(cfg: ModelConfig | GPTDimensions) -> GPTDimensions:
    return cfg if isinstance(cfg, GPTDimensions) else GPTDimensions.from_model_config(cfg)


def hf_to_megatron_global(
    hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig | GPTDimensions, *, fused_norms: bool = False,
) -> dict[str, torch.Tensor]:
    """Every global Megatron tensor from a full HF state dict (bit-exact; dtypes kept).

    Raises:
        HFCheckpointError: a tensor is missing, has the wrong shape, or is not used by the model
            (e.g. q_proj.bias for a model without QKV bias), naming it.
    """
    dims = _dims(cfg)
    names = megatron_global_shapes(dims, fused_norms=fused_norms)
    out = {name: to_megatron_tensor(name, hf_state, dims) for name in names}
    used = {n for name in out for n in hf_shapes_for(name, dims)}
    unused = [n for n in hf_state if n not in used and not _ignorable(n, dims)]
    if unused:
        raise HFCheckpointError(f"HF tensors not used by the model: {sorted(unused)[:5]} "
                                f"({len(unused)} in all); the checkpoint and the model config disagree")
    return out


def _ignorable(hf_name: str, dims: GPTDimensions) -> bool:
    # tied checkpoints sometimes store lm_head anyway (a copy of the embedding)
    return bool(IGNORED_HF_TENSORS.fullmatch(hf_name)) or (dims.tied and hf_name == "lm_head.weight")


def megatron_global_to_hf(
    global_state: Mapping[str, torch.Tensor], cfg: ModelConfig | GPTDimensions,
) -> dict[str, torch.Tensor]:
    """Every HF tensor from the global Megatron tensors; no ``lm_head`` when tied (bit-exact).

    Local-spec and Transformer Engine norm names are both accepted (detected from the names).
    """
    dims = _dims(cfg)
    fused = any(n.endswith("linear_qkv.layer_norm_weight") for n in global_state)
    expected = megatron_global_shapes(dims, fused_norms=fused)
    missing = [n for n in expected if n not in global_state]
    extra = [n for n in global_state if n not in expected]
    if missing or extra:
        raise HFCheckpointError(f"Megatron state does not match the config: missing {missing[:5]}, "
                                f"unexpected {extra[:5]}")
    out: dict[str, torch.Tensor] = {}
    for name in expected:
        out.update(to_hf_tensors(name, global_state[name], dims))
    return out
