"""From local gradient shards to the model's sketch: which pieces a rank projects, and the sum over
the TP group then the PP group.

The projection is linear and defined on global indices, so the sketch of the whole model is the sum
of every rank's partial ``[B, k]`` over its TP group and then its PP group (an all-reduce of
``B·k`` floats, never a gather of gradients). Two things must be counted exactly once:

* TP-replicated parameters (norms, unpartitioned biases) have the same gradient on every TP rank:
  only their owner (TP rank 0, :attr:`ParamLayout.owned`) projects them.
* A tied embedding under PP lives on the first stage (``embedding.word_embeddings.weight``) and as
  ``output_layer.weight`` on the last stage, under the same global name. Right after backward each
  copy holds a *partial* gradient and both are projected (the partials add up). If Megatron's
  ``finalize_model_grads`` has already all-reduced the embedding gradients (both copies then hold
  the full gradient), pass ``tied_grads_synced=True`` and only the first stage projects it.

DP ranks score disjoint prompts: nothing is reduced over DP.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_cropi.projection.base import ShardSpec

__all__ = ["reduce_sketch", "is_tied_copy", "projection_pieces", "project_local_gradients"]


def reduce_sketch(partial: torch.Tensor, groups) -> torch.Tensor:
    """Sum a partial sketch ``[B, k]`` over ``groups.tp`` and then ``groups.pp``, in place.

    Args:
        partial: this rank's ``[B, k]`` float32 contribution (overwritten with the sum).
        groups: a :class:`~megatron_cropi.parallel.ParallelGroups` (fields ``tp``, ``pp``,
            ``tp_size``, ``pp_size``).

    Returns:
        ``partial``, now the model's sketch on every rank of the TP×PP group.
    """
    import torch.distributed as dist

    if partial.dtype != torch.float32:
        raise TypeError(f"reduce_sketch expects a float32 [B, k] sketch, got {partial.dtype}")
    if groups.tp_size > 1:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=groups.tp)
    if groups.pp_size > 1:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=groups.pp)
    return partial


def is_tied_copy(layout) -> bool:
    """True for the last stage's ``output_layer.weight`` that carries the embedding's global name."""
    return layout.local_name.startswith("output_layer.") and layout.global_name != layout.local_name


def projection_pieces(layouts: Mapping[str, object], groups, *, tied_grads_synced: bool = False
                      ) -> list[tuple[str, tuple[slice, ...], ShardSpec]]:
    """The ``(local_name, local_slices, spec)`` blocks this rank projects, in a fixed order.

    Args:
        layouts: :func:`megatron_cropi.model.params.param_layouts` of this rank's model.
        groups: this rank's :class:`~megatron_cropi.parallel.ParallelGroups`.
        tied_grads_synced: the tied embedding copies already hold the full (all-reduced) gradient.
    """
    pieces = []
    for name, layout in layouts.items():
        if not layout.owned:
            continue
        if tied_grads_synced and groups.pp_size > 1 and is_tied_copy(layout):
            continue
        for local_slices, spec in layout.pieces:
            pieces.append((name, local_slices, spec))
    return pieces


def project_local_gradients(projector, grads: Mapping[str, torch.Tensor], layouts: Mapping[str, object], groups,
                            *, tied_grads_synced: bool = False) -> torch.Tensor | None:
    """This rank's partial sketch: ``Σ`` over its pieces of ``projector.project(grad[piece], spec)``.

    Args:
        projector: any :class:`~megatron_cropi.projection.base.Projector` (``project_many`` is used
            when it has one).
        grads: ``{local_name: [B, *local_shape]}`` per-prompt gradients of this rank's parameters;
            parameters missing here (frozen, or without gradient) are skipped.
        layouts, groups, tied_grads_synced: as in :func:`projection_pieces`.

    Returns:
        ``[B, k]`` float32, to be summed with :func:`reduce_sketch` (zeros when this rank owns no
        piece with a gradient, so that it still joins the collective); None when ``grads`` is empty.
    """
    items = []
    for name, local_slices, spec in projection_pieces(layouts, groups, tied_grads_synced=tied_grads_synced):
        grad = grads.get(name)
        if grad is None:
            continue
        items.append((grad[(slice(None),) + tuple(local_slices)], spec))
    if not items:
        if not grads:
            return None
        any_grad = next(iter(grads.values()))
        return torch.zeros(any_grad.shape[0], projector.k, dtype=torch.float32, device=any_grad.device)
    if hasattr(projector, "project_many"):
        return projector.project_many(items)
    out = projector.project(*items[0])
    for shard, spec in items[1:]:
        out += projector.project(shard, spec)
    return out
