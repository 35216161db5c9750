"""HF ↔ Megatron for a live, TP/PP-sharded ``GPTModel``: import, export, and weights for vLLM.

* :func:`load_hf_into_model`: every rank validates the whole checkpoint from the safetensors headers
  (so every rank fails the same way, before any data is read), then reads only the HF tensors behind
  its own parameters, builds each global Megatron tensor (:mod:`.hf_mapping`) and copies its blocks
  into the local shard via :func:`megatron_cropi.model.params.param_layouts`.
* :func:`iter_global_tensors` / :func:`megatron_to_hf_named_tensors`: full tensors, one parameter at a
  time, reassembled on one rank (the memory peak is the largest parameter, not the model).
* :func:`save_model_as_hf`: those tensors streamed into an HF directory on rank 0, atomically.

The model may be a bare ``GPTModel``, a wrapper with ``.module`` (DDP, Float16Module) or a
one-element list; the local and Transformer Engine layer specs are both handled (detected from the
parameter names). :func:`load_hf_into_model` also takes the interleaved schedule's list of V chunks
(:func:`~megatron_cropi.model.provider.build_model_chunks`): a chunk's layers are numbered locally
(``decoder.layers.0``…) but megatron gives each its global ``layer_number`` (the offset of
``get_transformer_layer_offset(config, vp_stage)``), which :func:`~megatron_cropi.model.params.param_layouts`
turns into global names, so each chunk reads exactly its own layers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch

from megatron_cropi.checkpoint.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    HFCheckpointReader,
    HFCheckpointWriter,
    hf_side_files,
    read_hf_config,
)
from megatron_cropi.checkpoint.hf_config import (
    IGNORED_HF_TENSORS,
    GPTDimensions,
    HFCheckpointError,
    hf_config_from_dimensions,
    model_config_from_hf_config,
)
from megatron_cropi.checkpoint.hf_mapping import (
    hf_shapes_for,
    megatron_global_shapes,
    to_hf_tensors,
    to_megatron_tensor,
)
from megatron_cropi.model.config import ModelConfig
from megatron_cropi.model.params import param_layouts
from megatron_cropi.parallel import ParallelGroups

__all__ = [
    "model_config_from_hf",
    "uses_fused_norm_names",
    "check_checkpoint_matches",
    "load_hf_into_model",
    "iter_global_tensors",
    "megatron_to_hf_named_tensors",
    "save_model_as_hf",
]


def model_config_from_hf(
    hf_dir: str | Path, *, params_dtype: str | None = None, layer_spec: str = "auto",
    max_sequence_length: int | None = None,
) -> ModelConfig:
    """The ``custom`` :class:`ModelConfig` of an HF Qwen2/Qwen2.5/Qwen3/Llama directory.

    See :func:`megatron_cropi.checkpoint.hf_mapping.model_config_from_hf_config` for the arguments.

    Raises:
        HFCheckpointError: unsupported architecture or feature, naming it and ``config.json``.
    """
    return model_config_from_hf_config(
        read_hf_config(hf_dir), params_dtype=params_dtype, layer_spec=layer_spec,
        max_sequence_length=max_sequence_length, source=str(Path(hf_dir) / "config.json"),
    )


def _chunks(model) -> list:
    """The unwrapped modules of ``model``: a list of chunks (interleaved schedule), or the one stage."""
    return [_unwrap(m) for m in model] if isinstance(model, (list, tuple)) else [_unwrap(model)]


def _unwrap(model):
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"expected one model chunk, got {len(model)} (virtual pipeline stages are not supported)")
        model = model[0]
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def uses_fused_norm_names(model) -> bool:
    """True for the Transformer Engine spec (norm weights live in ``linear_qkv``/``linear_fc1``)."""
    return any(n.endswith(("linear_qkv.layer_norm_weight", "linear_fc1.layer_norm_weight"))
               for n, _ in _unwrap(model).named_parameters())


def check_checkpoint_matches(reader: HFCheckpointReader, dims: GPTDimensions, *, fused_norms: bool = False) -> None:
    """Validate a whole HF checkpoint against a model from headers only (no tensor data read).

    Raises:
        HFCheckpointError: unsupported architecture, a config value that differs from the model,
            a missing tensor, a tensor of the wrong shape (naming it and both shapes), or a tensor
            the model would not use.
    """
    source = reader.path / "config.json"
    theirs = GPTDimensions.from_hf_config(reader.config, source=str(source))
    diffs = dims.differences(theirs)
    if diffs:
        raise HFCheckpointError(f"{source}: the checkpoint does not match the model (model vs checkpoint): "
                                + "; ".join(diffs))
    needed: dict[str, tuple[int, ...]] = {}
    for name in megatron_global_shapes(dims, fused_norms=fused_norms):
        needed.update(hf_shapes_for(name, dims))
    present = reader.names()
    missing = sorted(n for n in needed if n not in present)
    if missing:
        raise HFCheckpointError(f"{reader.path}: tensor {missing[0]!r} is missing from the checkpoint "
                                f"({len(missing)} missing in all)")
    for name, shape in needed.items():
        got = reader.shape(name)
        if tuple(got) != tuple(shape):
            raise HFCheckpointError(f"{reader.path}: tensor {name!r} has shape {tuple(got)}, the model "
                                    f"expects {tuple(shape)}")
    unused = sorted(n for n in present if n not in needed and not IGNORED_HF_TENSORS.fullmatch(n)
                    and not (dims.tied and n == "lm_head.weight"))
    if unused:
        raise HFCheckpointError(f"{reader.path}: tensor {unused[0]!r} is not used by the model "
                                f"({len(unused)} unused in all); the checkpoint and the model disagree")


@torch.no_grad()
def load_hf_into_model(model, groups: ParallelGroups, hf_dir: str | Path) -> int:
    """Fill this rank's parameters from an HF safetensors directory; returns how many it set.

    Every rank of every layout calls this; there is no communication. Each rank reads only the
    HF tensors behind its own parameters (e.g. a PP stage reads only its layers). Load before
    the optimizer is built (a distributed optimizer keeps its own fp32 copy of the parameters).

    Args:
        model: this rank's stage, or the interleaved schedule's list of its V chunks (each filled with
            its own global layers).

    Raises:
        HFCheckpointError: see :func:`check_checkpoint_matches`; also a missing directory, config,
            shard file, or an unreadable shard, naming it.
    """
    chunks = _chunks(model)
    reader = HFCheckpointReader(hf_dir)
    dims = GPTDimensions.from_model(chunks[0])  # the global sizes: the same on every chunk
    check_checkpoint_matches(reader, dims, fused_norms=uses_fused_norm_names(chunks[0]))
    count = 0
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        # One global tensor at a time: the peak is the largest parameter (the embedding), not the model.
        for name, layout in param_layouts(chunk, groups).items():
            full = to_megatron_tensor(layout.global_name, reader.get_many(hf_shapes_for(layout.global_name, dims)),
                                      dims)
            p = params[name]
            for local_slices, spec in layout.pieces:
                p.data[local_slices].copy_(full[spec.global_slices()])
            count += 1
    return count


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _to_bits(t: torch.Tensor) -> torch.Tensor:
    # An integer image of the bits: summing it over ranks where one rank holds each element and the
    # others hold 0 reproduces the element exactly (a float sum would turn -0.0 into +0.0).
    bits = t.view(_BITS[t.element_size()])
    return bits.to(torch.int32) if t.element_size() < 4 else bits


def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    return bits.to(_BITS[size]).view(dtype) if size < 4 else bits.view(dtype)


def _order_key(name: str):
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return ({"embedding.word_embeddings.weight": 0, "decoder.final_layernorm.weight": 2}.get(name, 3), 0, name)


def iter_global_tensors(model, groups: ParallelGroups, *, dst: int | None = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(global Megatron name, full tensor on CPU)`` one parameter at a time, in model order.

    A collective over the whole world: **every rank must exhaust the iterator**. Ranks other than
    ``dst`` yield nothing (every rank yields when ``dst`` is None). Values are bit-exact in the
    parameters' own dtype; each is reassembled by a sum over ranks of its owned blocks (TP rank 0
    for replicated parameters, DP replica 0, and one copy of a tied embedding).
    """
    import torch.distributed as dist

    model = _unwrap(model)
    params = dict(model.named_parameters())
    mine = {}
    if groups.dp_rank == 0:
        for name, layout in param_layouts(model, groups).items():
            if not layout.owned or (name == "output_layer.weight" and layout.global_name != name):
                continue  # replicated elsewhere, or the last stage's copy of a tied embedding
            mine[layout.global_name] = (params[name], layout)
    catalogue = {g: (tuple(lay.global_shape), str(p.dtype).removeprefix("torch.")) for g, (p, lay) in mine.items()}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, catalogue)
    everything: dict[str, tuple] = {}
    for part in parts:
        everything.update(part)
    me = dist.get_rank()
    for gname in sorted(everything, key=_order_key):
        shape, dtype_name = everything[gname]
        dtype = getattr(torch, dtype_name)
        buf = torch.zeros(shape, dtype=dtype, device=groups.device)
        if gname in mine:
            p, layout = mine[gname]
            for local_slices, spec in layout.pieces:
                buf[spec.global_slices()] = p.data[local_slices]
        bits = _to_bits(buf)
        if dst is None:
            dist.all_reduce(bits)
        else:
            dist.reduce(bits, dst=dst)
        if dst is None or me == dst:
            yield gname, _from_bits(bits, dtype).cpu()
        del buf, bits


def megatron_to_hf_named_tensors(
    model, groups: ParallelGroups, *, dst: int | None = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(HF name, full tensor)`` for the whole model, e.g. to push weights into a vLLM engine.

    Same collective contract as :func:`iter_global_tensors` (every rank must exhaust it). No
    ``lm_head.weight`` when the embeddings are tied.
    """
    dims = GPTDimensions.from_model(_unwrap(model))
    for gname, tensor in iter_global_tensors(model, groups, dst=dst):
        yield from to_hf_tensors(gname, tensor, dims).items()


def save_model_as_hf(
    model, groups: ParallelGroups, cfg: ModelConfig | None, out_dir: str | Path, *,
    source_hf_dir: str | Path | None = None, dtype: torch.dtype | None = None, overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the model as an HF directory (config.json + safetensors) on global rank 0.

    Every rank must call it. Tensors are gathered one parameter at a time and streamed into shards
    of at most ``max_shard_bytes``; the directory appears atomically when complete.

    Args:
        cfg: the model's config (checked against the model; gives ``max_position_embeddings``).
        source_hf_dir: the HF directory the model came from: its config keys we do not own (token
            ids, ...) and its tokenizer/generation files are carried over, so vLLM can serve the export.
        dtype: cast the tensors (default: the parameters' dtype).
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir`` on every rank, after rank 0 has committed it.

    Raises:
        FileExistsError / HFCheckpointError / OSError: on every rank when rank 0's write fails.
    """
    import torch.distributed as dist

    from megatron_cropi.utils.rank_zero import share_from_rank0

    inner = _unwrap(model)
    dims = GPTDimensions.from_model(inner)
    if cfg is not None:
        diffs = GPTDimensions.from_model_config(cfg).differences(dims)
        if diffs:
            raise ValueError("cfg does not describe this model (cfg vs model): " + "; ".join(diffs))
    writing = dist.get_rank() == 0
    writer, error = None, None
    if writing:
        try:
            writer = HFCheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    shared = share_from_rank0(error)  # rank 0's write error stops every rank
    if shared is not None:
        raise shared
    param_dtype = next(inner.parameters()).dtype
    # Keep taking part in the collectives after a local write error, so no rank is left waiting.
    for name, tensor in megatron_to_hf_named_tensors(inner, groups, dst=0):
        if writer is not None and error is None:
            try:
                writer.add(name, tensor if dtype is None else tensor.to(dtype))
            except Exception as err:  # noqa: BLE001
                error = err
    if writing:
        try:
            if error is None:
                base = read_hf_config(source_hf_dir) if source_hf_dir is not None else None
                max_pos = cfg.max_sequence_length if cfg is not None else inner.max_sequence_length
                config = hf_config_from_dimensions(dims, dtype=dtype or param_dtype, max_position_embeddings=max_pos,
                                                   base=base)
                writer.commit(config, side_files=hf_side_files(source_hf_dir) if source_hf_dir else ())
        except Exception as err:  # noqa: BLE001
            error = err
        finally:
            writer.abort()
    shared = share_from_rank0(error)  # rank 0's write error stops every rank
    if shared is not None:
        raise shared
    return Path(out_dir)
