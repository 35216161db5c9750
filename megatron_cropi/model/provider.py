"""Build the policy: a Megatron-Core ``GPTModel`` of the Qwen2 or Qwen3 (dense) family on this rank's
TP/PP shard.

``build_gpt_model(cfg, groups)`` is the model provider every step uses (capture, sampler, GRPO,
checkpoint conversion). The layer spec comes from Megatron's own spec functions: Transformer Engine's
when it is importable (GPU images), megatron-core's local spec otherwise (CPU).

Under the interleaved (virtual pipeline) schedule (``model.transformer.virtual_pipeline_model_parallel_size
= V``) a rank holds V model chunks, one ``GPTModel(vp_stage=v)`` each: :func:`build_model_chunks`. With
PP = P and L layers, chunk ``v`` of pipeline rank ``r`` holds the global layers
``[(v·P + r)·L/(P·V), (v·P + r + 1)·L/(P·V))`` (P = 2, V = 2, L = 4: rank 0 holds layers 0 and 2), the
embedding is on chunk 0 of rank 0 and the output layer on chunk V − 1 of rank P − 1. POPI capture
(``popi/capture.py``) and the scoring commands run on chunks (``wiring.build_scoring_model``: HF and
distributed checkpoints load into them); everything that takes one module refuses such a config by name.
"""

from __future__ import annotations

import importlib.util

import torch

from megatron_cropi.model.config import ModelConfig
from megatron_cropi.parallel import ParallelGroups

__all__ = ["build_transformer_config", "build_layer_spec", "build_gpt_model", "build_model_chunks", "resolve_layer_spec",
           "DTYPES", "SequenceParallelTorchNorm"]

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
    if cfg.virtual_pipeline_size is not None:
        # The interleaved schedule sends to the previous and the next stage in one exchange; at PP = 2
        # they are the same rank, and batch_isend_irecv (megatron's default) posts send_prev before
        # send_next while the peer posts recv_prev before recv_next: activation and gradient swap
        # (measured: wrong losses from the third micro-batch on). Megatron's unbatched path puts the two
        # directions on different process groups; Megatron-LM turns batching off for VPP too.
        kwargs.setdefault("batch_p2p_comm", False)
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
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization=cfg.transformer["normalization"])
    if cfg.transformer.get("sequence_parallel"):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        spec = _replace_module(spec, WrappedTorchNorm, SequenceParallelTorchNorm)
    return spec


class SequenceParallelTorchNorm:
    """A torch ``RMSNorm``/``LayerNorm`` for the local spec under sequence parallelism.

    megatron-core's local spec builds its norms with ``WrappedTorchNorm``, which refuses
    ``sequence_parallel`` (an assertion at model build). Under SP a norm sees this rank's sequence shard
    ``[s/t, b, h]`` (q/k norms: all positions, this rank's heads), so its weight gradient on each TP rank
    is a partial sum; the flag ``param.sequence_parallel`` is what megatron's ``finalize_model_grads``
    reads to all-reduce it over TP, and what :func:`~megatron_cropi.model.params.param_layouts` reads to
    treat it as a TP partial. The module itself is the plain torch class, so the batched POPI tap
    (:mod:`megatron_cropi.popi.hooks`) hooks it like any other norm.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        kinds = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag, False):  # what WrappedTorchNorm refuses too
                raise ValueError(f"model.transformer.{flag} is not supported by torch norms (local spec)")
        if config.normalization not in kinds:
            raise ValueError(f"model.transformer.normalization={config.normalization!r}: expected RMSNorm or "
                             "LayerNorm with sequence_parallel on the local spec")
        norm = kinds[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        return norm


def _replace_module(spec, old: type, new: type):
    """``spec`` (a ``ModuleSpec`` tree) with every ``old`` module class replaced by ``new``."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_replace_module(spec.module, old, new),
                                   submodules=_replace_module(spec.submodules, old, new))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _replace_module(getattr(spec, f.name), old, new)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def _block_spec(layer_spec, tcfg, groups: ParallelGroups, vp_stage: int | None = None):
    """Under sequence parallelism on the local spec, the decoder block with its final norm made the same
    way as the layers' (:class:`SequenceParallelTorchNorm`): given a layer spec, megatron-core picks the
    final norm itself (TE's, apex's, or ``WrappedTorchNorm``, which refuses SP)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if not (tcfg.sequence_parallel and isinstance(layer_spec, ModuleSpec)):
        return layer_spec
    norm = getattr(layer_spec.submodules, "input_layernorm", None)
    if norm is not SequenceParallelTorchNorm:
        return layer_spec
    layers = get_num_layers_to_build(tcfg, vp_stage=vp_stage, pp_rank=groups.pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=SequenceParallelTorchNorm)


def build_gpt_model(cfg: ModelConfig, groups: ParallelGroups, *, layer_spec=None, transformer_config=None,
                    vp_stage: int | None = None):
    """This rank's ``GPTModel`` stage (or, with ``vp_stage``, one virtual-pipeline chunk of it), on
    ``groups.device``.

    Args:
        cfg: the model configuration.
        groups: this run's process groups (TP/PP sizes, stage of this rank).
        layer_spec: a Megatron ``ModuleSpec`` overriding :func:`build_layer_spec` (capture specs).
        transformer_config: a prebuilt ``TransformerConfig`` (default: :func:`build_transformer_config`).
        vp_stage: the virtual pipeline stage ``v`` in ``[0, V)`` of the chunk to build (interleaved
            schedule only; :func:`build_model_chunks` builds all of them).

    Returns:
        ``GPTModel`` with ``pre_process``/``post_process`` set for this pipeline stage (and chunk);
        logits are vocab-parallel (``parallel_output=True``).

    Raises:
        ValueError: ``cfg`` sets the interleaved schedule and no ``vp_stage`` is given (a caller that
            runs one module per stage cannot run it), or ``vp_stage`` is given without it.
    """
    from megatron.core.models.gpt import GPTModel

    tcfg = transformer_config or build_transformer_config(cfg, groups)
    vp = tcfg.virtual_pipeline_model_parallel_size
    if vp is not None and vp_stage is None:
        raise ValueError(f"model.transformer.virtual_pipeline_model_parallel_size={vp}: the interleaved schedule "
                         "needs one model chunk per virtual stage (build_model_chunks); this step runs one module "
                         "per pipeline stage and does not support it")
    if vp_stage is not None and not (vp is not None and 0 <= vp_stage < vp):
        raise ValueError(f"vp_stage={vp_stage} needs model.transformer.virtual_pipeline_model_parallel_size > "
                         f"vp_stage, got {vp}")
    # the embedding lives on the first chunk of the first stage, the output layer on the last of the last
    first_chunk = vp_stage is None or vp_stage == 0
    last_chunk = vp_stage is None or vp_stage == vp - 1
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=_block_spec(layer_spec or build_layer_spec(cfg), tcfg, groups, vp_stage),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        pre_process=groups.is_first_stage and first_chunk,
        post_process=groups.is_last_stage and last_chunk,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base,
        pg_collection=groups.pg_collection,
        vp_stage=vp_stage,
    )
    return model.to(groups.device)


def build_model_chunks(cfg: ModelConfig, groups: ParallelGroups, *, layer_spec=None) -> list:
    """This rank's model as a list of chunks: ``V`` ``GPTModel`` chunks (``vp_stage = 0 … V − 1``, in
    Megatron's order) under the interleaved schedule, else the one stage. The chunks share one
    ``TransformerConfig``, as megatron's schedule expects (it reads ``model[0].config``)."""
    tcfg = build_transformer_config(cfg, groups)
    vp = tcfg.virtual_pipeline_model_parallel_size
    stages = range(vp) if vp is not None else [None]
    return [build_gpt_model(cfg, groups, layer_spec=layer_spec, transformer_config=tcfg, vp_stage=v) for v in stages]
