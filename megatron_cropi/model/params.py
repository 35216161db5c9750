"""Global identity of every local parameter shard: global name, global shape, where the shard sits.

Under TP and PP a rank holds pieces of some parameters. Projection, gradient checks and checkpoint
conversion all need to know, for each local element, which element of the *unsharded* model it is:

* PP: ``decoder.layers.{i}`` on a stage is global layer ``layer_number - 1`` (Megatron numbers
  layers globally). With tied embeddings the last stage's ``output_layer.weight`` is a copy of
  ``embedding.word_embeddings.weight`` and carries that global name (its gradient is a partial sum).
* TP: a partitioned parameter (``tensor_model_parallel``) is split evenly along ``partition_dim``.
  SwiGLU's ``linear_fc1`` is the exception: each TP shard is ``[gate_shard; up_shard]``, so a shard is
  two blocks of the global ``[gate; up]`` tensor.
* Replicated parameters (norms, non-partitioned biases) hold the same values and gradients on every
  TP rank; they are *owned* by TP rank 0 so that sums over the TP group count them once. Qwen3's
  per-head q/k norms are the exception: their values are replicated but each TP rank's raw gradient
  comes from its own heads only (``grad_partial_over_tp``), so the raw gradients of all TP ranks add
  up, as megatron's ``finalize_model_grads`` adds them for training. Under sequence parallelism
  (``sequence_parallel`` on, TP > 1) the same holds for every parameter megatron flags
  ``param.sequence_parallel`` (the norms): each TP rank's raw gradient sums over its sequence shard only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.projection.base import ShardSpec

__all__ = ["ShardSpec", "ParamLayout", "param_layouts", "init_params_by_global_name", "assemble_global_tensors"]


@dataclass(frozen=True)
class ParamLayout:
    """Where one local parameter sits in the global model.

    Attributes:
        local_name: name in this rank's module (``decoder.layers.0.mlp.linear_fc1.weight``).
        pieces: ``(local_slices, ShardSpec)`` pairs covering the local tensor.
        owned: False for a TP-replicated parameter on TP ranks other than 0.
        grad_partial_over_tp: replicated values, but the raw gradient on each TP rank is a partial sum
            (q/k norms: each rank normalises its own heads; under sequence parallelism every norm: each
            rank normalises its own positions); the TP ranks' raw gradients add up.
    """

    local_name: str
    pieces: tuple[tuple[tuple[slice, ...], ShardSpec], ...]
    owned: bool
    grad_partial_over_tp: bool = False

    @property
    def projects_raw_grad(self) -> bool:
        """This rank contributes its raw (not yet TP-reduced) gradient to a sum over the TP group."""
        return self.owned or self.grad_partial_over_tp

    @property
    def global_name(self) -> str:
        return self.pieces[0][1].global_name

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.pieces[0][1].global_shape


def _global_name(local_name: str, model, tied: bool) -> str:
    if local_name.startswith("decoder.layers."):
        idx = int(local_name.split(".")[2])
        layer = model.decoder.layers[idx].layer_number - 1
        return local_name.replace(f"decoder.layers.{idx}.", f"decoder.layers.{layer}.", 1)
    if tied and local_name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    return local_name


def _is_swiglu_fc1(local_name: str, model) -> bool:
    return ".mlp.linear_fc1." in local_name and bool(getattr(model.config, "gated_linear_unit", False))


def _is_qk_norm(local_name: str, model) -> bool:
    # megatron's finalize_model_grads sums these over TP by the same rule (config.qk_layernorm + name)
    return bool(getattr(model.config, "qk_layernorm", False)) and (
        ".q_layernorm." in local_name or ".k_layernorm." in local_name)


def _is_sequence_parallel(param, model) -> bool:
    # finalize_model_grads' other TP-sum rule: config.sequence_parallel and param.sequence_parallel
    return bool(getattr(model.config, "sequence_parallel", False)) and bool(getattr(param, "sequence_parallel", False))


def param_layouts(model, groups: ParallelGroups) -> dict[str, ParamLayout]:
    """The :class:`ParamLayout` of every parameter of this rank's model, by local name."""
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    tp, tp_rank = groups.tp_size, groups.tp_rank
    layouts = {}
    for name, p in model.named_parameters():
        gname = _global_name(name, model, tied)
        local_shape = tuple(p.shape)
        full = tuple(slice(0, s) for s in local_shape)
        if getattr(p, "tensor_model_parallel", False):
            dim = p.partition_dim
            gshape = list(local_shape)
            gshape[dim] *= tp
            gshape = tuple(gshape)
            if _is_swiglu_fc1(name, model):
                half = local_shape[dim] // 2
                pieces = []
                for part in range(2):  # gate block, then up block
                    lsl = list(full)
                    lsl[dim] = slice(part * half, (part + 1) * half)
                    off = [0] * len(gshape)
                    off[dim] = part * half * tp + tp_rank * half
                    shp = list(local_shape)
                    shp[dim] = half
                    pieces.append((tuple(lsl), ShardSpec(gname, gshape, tuple(off), tuple(shp))))
                pieces = tuple(pieces)
            else:
                off = [0] * len(gshape)
                off[dim] = tp_rank * local_shape[dim]
                pieces = ((full, ShardSpec(gname, gshape, tuple(off), local_shape)),)
            owned = True
        else:
            pieces = ((full, ShardSpec(gname, local_shape, (0,) * len(local_shape), local_shape)),)
            owned = tp_rank == 0
        partial = tp > 1 and not getattr(p, "tensor_model_parallel", False) and (
            _is_qk_norm(name, model) or _is_sequence_parallel(p, model))
        layouts[name] = ParamLayout(name, pieces, owned, grad_partial_over_tp=partial)
    return layouts


def _seed_for(seed: int, global_name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{global_name}".encode(), digest_size=8).digest(), "little") >> 1


@torch.no_grad()
def init_params_by_global_name(model, groups: ParallelGroups, *, seed: int = 0, std: float = 0.02) -> None:
    """Initialise every parameter from ``(seed, global name)`` only, so any TP/PP layout holds the
    same global model bit for bit (tests, and reproducible tiny models across layouts).

    Matrices and embeddings get ``N(0, std²)``; 1-D weights of norms get ``1 + N(0, 0.1²)``, biases
    ``N(0, std²)``.
    """
    for name, layout in param_layouts(model, groups).items():
        p = dict(model.named_parameters())[name]
        gen = torch.Generator().manual_seed(_seed_for(seed, layout.global_name))
        full = torch.randn(layout.global_shape, generator=gen, dtype=torch.float32)
        full = 1.0 + 0.1 * full if ("norm" in name and name.endswith("weight")) else std * full
        for local_slices, spec in layout.pieces:
            p[local_slices].copy_(full[spec.global_slices()].to(p.dtype))


def assemble_global_tensors(model, groups: ParallelGroups, *, attr: str = "grad", dst: int | None = None):
    """Reassemble full tensors by global name from all ranks (tests and tiny models only).

    Each rank of data-parallel replica 0 scatters its owned pieces into zero tensors of global shape;
    rank ``dst`` (every rank when None) receives the sum over all ranks. Partial gradients of a tied
    embedding under PP add up.

    Args:
        attr: ``"grad"`` (``.grad``, falling back to ``.main_grad``) or ``"data"``.

    Returns:
        ``{global_name: tensor}`` in float32 on CPU, or None on ranks other than ``dst``.
    """
    import torch.distributed as dist

    mine: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for name, layout in param_layouts(model, groups).items():
        p = params[name]
        value = p.data if attr == "data" else (p.grad if p.grad is not None else getattr(p, "main_grad", None))
        # raw gradients: a q/k norm's TP partials add up (values are replicated: TP rank 0 only)
        counted = layout.projects_raw_grad if attr == "grad" else layout.owned
        if value is None or not counted or groups.dp_rank != 0:
            continue
        if attr == "data" and (layout.global_name in mine or name != layout.global_name and name == "output_layer.weight"):
            continue  # tied output-layer copy under PP: the first stage's embedding holds the same values
        out = mine.setdefault(layout.global_name, torch.zeros(layout.global_shape))
        for local_slices, spec in layout.pieces:
            out[spec.global_slices()] += value[local_slices].detach().float().cpu()
    gathered = [None] * dist.get_world_size()
    if dst is None:
        dist.all_gather_object(gathered, mine)
    else:
        dist.gather_object(mine, gathered if dist.get_rank() == dst else None, dst=dst)
        if dist.get_rank() != dst:
            return None
    result: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            # TP shards of one tensor are disjoint pieces of zeros-elsewhere tensors: they add up
            result[k] = result[k] + v if k in result else v
    return result
