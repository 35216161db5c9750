"""Activation and logits memory of one pipeline stage: pure arithmetic on the shapes.

What :mod:`megatron_cropi.memory` charges to training and scoring besides the capture's transient
(:mod:`megatron_cropi.memory_capture`): the bytes one transformer layer keeps for backward
(:func:`layer_activation_bytes`), a stage's layers with its micro-batches in flight and its
recomputation (:func:`stage_activation_bytes`), and the last stage's logits with the log-prob's work
on them (:func:`logits_bytes`). ``m`` is a :class:`~megatron_cropi.memory.ModelShape`; nothing here
imports torch or touches a device.
"""

from __future__ import annotations

import math

__all__ = ["layer_activation_bytes", "stage_activation_bytes", "CHUNK_FP32_COPIES", "logits_bytes"]


def layer_activation_bytes(m, *, seq: int, micro_batch: int, tp: int, attention: str = "unfused",
                           sequence_parallel: bool = False, act_bytes: int = 2) -> dict:
    """Bytes one transformer layer of ``m`` (a :class:`~megatron_cropi.memory.ModelShape`) keeps for
    backward, for ``b`` sequences of ``s`` tokens.

    Counting what autograd saves in megatron-core's Qwen2 layer (RMSNorm, SwiGLU, GQA, RoPE, no
    dropout), with ``h_q = a·d``, ``h_kv = g·d`` and ``a`` (``e`` = ``act_bytes``)::

        inputs  = 4·e·s·b·h            input-norm input, QKV input, pre-MLP-norm input, fc1 input (÷ t with SP)
        attn    = e·s·b·h_q/t           output projection input (the attention context)
        core    = unfused: e·s·b·3h_q/t (Q, and K, V expanded to all heads) + (4 + e)·s²·b·a/t
                           (fp32 softmax output + probabilities in the activation dtype)
                  flash:   e·s·b·(h_q + 2h_kv)/t (Q, K, V; no s² term)
        mlp     = 4·e·s·b·f/t           fc1 output (gate and up), SiLU output, fc2 input (gated;
                                        ungated: 2·e·s·b·f/t)

    ``unfused`` is the local spec's attention (the only spec batched scoring supports); ``flash`` is
    Transformer Engine's fused attention.

    Returns:
        ``{"full": bytes kept without recomputation, "core_attention": the part that selective
        recomputation of core attention drops, "core_inputs": what it keeps instead, "input": the
        layer's input (what full recomputation keeps)}``.
    """
    s, b, e, h = seq, micro_batch, act_bytes, m.hidden
    hq, hkv = m.heads * m.head_dim, m.query_groups * m.head_dim
    sb = s * b
    inputs = 4 * e * sb * h // (tp if sequence_parallel else 1)
    attn = e * sb * hq // tp
    if attention == "flash":
        core = e * sb * (hq + 2 * hkv) // tp
    elif attention == "unfused":
        core = e * sb * 3 * hq // tp + (4 + e) * s * s * b * m.heads // tp
    else:
        raise ValueError(f"attention must be 'unfused' or 'flash', got {attention!r}")
    mlp = (4 if m.gated else 2) * e * sb * m.ffn // tp
    return {"full": inputs + attn + core + mlp, "core_attention": core,
            "core_inputs": e * sb * (hq + 2 * hkv) // tp,
            "input": e * sb * h // (tp if sequence_parallel else 1)}


def stage_activation_bytes(layer: dict, *, layers: int, in_flight: int, recompute: str | None = None,
                           recompute_method: str | None = None, recompute_num_layers: int | None = None) -> int:
    """Activation bytes of a stage of ``layers`` layers with ``in_flight`` micro-batches held (1F1B).

    * no recomputation: ``in_flight × layers × full``;
    * ``selective`` (core attention): the core-attention part is replaced by its inputs, and one
      layer's core attention is rebuilt during backward (+ ``core_attention`` once);
    * ``full``, ``uniform`` with ``n`` layers per chunk: each chunk keeps its input
      (``ceil(layers / n) × input`` per micro-batch) and one chunk is rebuilt during backward
      (+ ``n × full`` once); ``block``: the first ``n`` layers keep only their inputs, the rest keep all.
    """
    full, core = layer["full"], layer["core_attention"]
    if recompute is None:
        return in_flight * layers * full
    if recompute == "selective":
        kept = full - core + layer["core_inputs"]
        return in_flight * layers * kept + core
    if recompute != "full":
        raise ValueError(f"recompute must be None, 'selective' or 'full', got {recompute!r}")
    n = max(1, min(recompute_num_layers or 1, layers))
    if recompute_method == "block":
        return in_flight * (n * layer["input"] + (layers - n) * full) + full
    return in_flight * math.ceil(layers / n) * layer["input"] + n * full


CHUNK_FP32_COPIES = 4
"""fp32 ``[c, V/t]`` work tensors alive at once in a chunk of the chunked log-prob/entropy: the chunk's
tempered logits, their shifted copy, its ``exp`` and (entropy) ``exp · z``."""


def logits_bytes(vocab: int, *, tp: int, seq: int, micro_batch: int, fp32_copies: int, act_bytes: int = 2,
                 chunk_tokens: int = 0, logit_grads: int = 1) -> int:
    """Logits of the last stage and the log-prob/entropy work on them, for ``N = s × b`` positions.

    * ``chunk_tokens = 0`` (the whole-tensor path of :mod:`megatron_cropi.model.logprobs`):
      ``V/t × N × (e + 4 × copies)``: the logits in the activation dtype plus ``fp32_copies`` fp32
      ``[N, V/t]`` tensors kept for backward: 3 for the log-prob (the fp32/tempered logits, their
      shifted copy and its ``exp``), 5 with an entropy bonus (its ``exp`` and tempered logits too).
    * ``chunk_tokens = c > 0``: ``V/t × (N × e × (1 + logit_grads) + min(c, N) × 4 × 4)``: the logits
      (kept for backward by the autograd functions themselves, no copy), ``logit_grads`` gradients of
      them in the activation dtype during backward (2 with an entropy bonus: autograd sums the
      log-prob's and the entropy's), and :data:`CHUNK_FP32_COPIES` fp32 ``[c, V/t]`` work tensors.
    """
    n, v = seq * micro_batch, vocab // tp
    if chunk_tokens <= 0:
        return v * n * (act_bytes + 4 * fp32_copies)
    return v * (n * act_bytes * (1 + logit_grads) + min(chunk_tokens, n) * 4 * CHUNK_FP32_COPIES)
