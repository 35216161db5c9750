"""After each update, make the rollout engine sample from the new weights.

* :class:`SharedWeights`: the native Megatron sampler runs the trained ``GPTModel`` object itself
  (DDP keeps the module and only moves parameter storage into its buffers), so there is nothing to do.
* :class:`VLLMWeightPush`: full HF-named tensors are streamed into the *running* engine(s) with their
  ``update_weights`` (``reload_weights`` in place: vLLM's ``load_weights`` keeps each engine-TP rank's
  slice; CPU GEMM re-pack; prefix-cache reset; no checkpoint on disk). The stream is
  :func:`iter_hf_weight_buckets`: shard to shard, bucket by bucket, in the training dtype, within this
  rank's own trainer TP and PP groups only (nothing crosses data-parallel replicas, nothing is reduced,
  no rank ever holds more than one bucket beyond its own shards). An engine that cannot take weights in
  place (``isolate=True``: a fresh process per generate) gets an HF directory instead
  (:func:`~megatron_cropi.checkpoint.save_model_as_hf`, written atomically) that it reads next time.

Every rank must call :meth:`~VLLMWeightPush.push` (the gathers are collectives); a rank without an engine
drains the stream.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch

from megatron_cropi.parallel import ParallelGroups

__all__ = ["WeightSync", "SharedWeights", "VLLMWeightPush", "weight_sync_for", "iter_hf_weight_buckets",
           "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 256 << 20
"""Bytes (training dtype) gathered per bucket: one TP all-gather and one PP broadcast each."""


def _owned_tensors(inner, groups: ParallelGroups) -> dict[str, tuple[torch.nn.Parameter, object]]:
    """``{global name: (local parameter, its layout)}`` of this rank's stage, the tied output copy left out."""
    from megatron_cropi.model.params import param_layouts

    params = dict(inner.named_parameters())
    return {lay.global_name: (params[name], lay) for name, lay in param_layouts(inner, groups).items()
            if not (name == "output_layer.weight" and lay.global_name != name)}


def _plan_buckets(inner, groups: ParallelGroups, mine: dict, bucket_bytes: int) -> list[tuple[int, list[str]]]:
    """``[(owning PP stage, global names)]`` in model order; a bucket holds one stage's tensors of one
    dtype, up to ``bucket_bytes`` (a larger tensor is a bucket of its own). The same on every rank."""
    import torch.distributed as dist

    from megatron_cropi.checkpoint.hf import _order_key

    catalogue = {g: (torch.Size(lay.global_shape).numel(), p.element_size(), str(p.dtype)) for g, (p, lay) in mine.items()}
    stages = [catalogue]
    if groups.pp_size > 1:
        stages = [None] * groups.pp_size
        dist.all_gather_object(stages, catalogue, group=groups.pp)
    owner = {}
    for stage, cat in enumerate(stages):
        for g, info in cat.items():
            owner.setdefault(g, (stage, info))  # a tied embedding: the first stage's copy
    buckets: list[tuple[int, list[str]]] = []
    size, key = 0, None
    for g in sorted(owner, key=_order_key):
        stage, (numel, elsize, dtype) = owner[g]
        if (stage, dtype) != key or size + numel * elsize > bucket_bytes:
            buckets.append((stage, []))
            size, key = 0, (stage, dtype)
        buckets[-1][1].append(g)
        size += numel * elsize
    return buckets


def _gather_full(p: torch.nn.Parameter, layout, groups: ParallelGroups, tp_layouts) -> torch.Tensor:
    """One partitioned tensor, all-gathered over this rank's TP group as bytes (bit-exact, its dtype).

    Split along dim 0 in one block per rank (column-parallel weights, the vocab-parallel embedding): the
    shards land straight in the full tensor (extra memory: the full tensor). Otherwise (row-parallel
    weights, SwiGLU's ``[gate; up]`` shards): gathered, then placed piece by piece (twice the size)."""
    import torch.distributed as dist

    full = torch.empty(layout.global_shape, dtype=p.dtype, device=p.device)
    local = p.data.contiguous()
    if len(layout.pieces) == 1 and getattr(p, "partition_dim", None) == 0:
        dist.all_gather([c.view(torch.uint8) for c in full.chunk(groups.tp_size, dim=0)], local.view(torch.uint8),
                        group=groups.tp)
        return full
    parts = [torch.empty_like(local) for _ in range(groups.tp_size)]
    dist.all_gather([t.view(torch.uint8) for t in parts], local.view(torch.uint8), group=groups.tp)
    for r, shard in enumerate(parts):
        for local_slices, spec in tp_layouts[r][layout.local_name].pieces:
            full[spec.global_slices()] = shard[local_slices]
    return full


def _gather_bucket(names, mine, groups, tp_layouts) -> dict[str, torch.Tensor]:
    """Full tensors of one bucket on its owning stage: partitioned ones gathered over this rank's TP group
    (:func:`_gather_full`), replicated ones taken as they are (no copy, no communication)."""
    out: dict[str, torch.Tensor] = {}
    for g in names:
        p, layout = mine[g]
        split = tuple(layout.global_shape) != tuple(p.shape)
        out[g] = _gather_full(p, layout, groups, tp_layouts) if split else p.data
    return out


def iter_hf_weight_buckets(model, groups: ParallelGroups, *,
                           bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(HF name, full tensor)`` for the whole model on **every** rank, bucket by bucket.

    A collective over this rank's TP and PP groups only: **every rank must exhaust the iterator**.
    Per bucket, the owning stage all-gathers each partitioned tensor's TP shards (bytes, bit-exact, the
    training dtype) and broadcasts the bucket's full tensors over its PP group as one flat buffer; DP
    replicas never talk (each holds the same weights). Peak extra memory per rank: about one bucket
    (``bucket_bytes``, or one tensor larger than it) plus one tensor's gathered shards; replicated
    tensors, and every tensor at TP = PP = 1, are the parameters themselves (no copy).
    The tensors are valid until the next item is drawn. No ``lm_head.weight`` when the embeddings are tied.
    """
    import torch.distributed as dist

    from megatron_cropi.checkpoint.hf import _unwrap
    from megatron_cropi.checkpoint.hf_config import GPTDimensions
    from megatron_cropi.checkpoint.hf_mapping import to_hf_tensors
    from megatron_cropi.model.params import param_layouts

    inner = _unwrap(model)
    dims = GPTDimensions.from_model(inner)
    mine = _owned_tensors(inner, groups)
    buckets = _plan_buckets(inner, groups, mine, bucket_bytes)
    tp_layouts = [param_layouts(inner, SimpleNamespace(tp_size=groups.tp_size, tp_rank=r))
                  for r in range(groups.tp_size)]
    device = next(inner.parameters()).device
    for stage, names in buckets:
        if stage == groups.pp_rank:
            full = _gather_bucket(names, mine, groups, tp_layouts)
        if groups.pp_size > 1:  # the stage's full tensors, as one flat byte buffer, to the other stages
            meta = [[(g, tuple(full[g].shape), str(full[g].dtype)) for g in names] if stage == groups.pp_rank else None]
            dist.broadcast_object_list(meta, src=dist.get_global_rank(groups.pp, stage), group=groups.pp)
            shapes = meta[0]
            dtype = getattr(torch, shapes[0][2].removeprefix("torch."))
            numels = [int(torch.Size(s).numel()) for _, s, _ in shapes]
            flat = (torch.cat([full[g].reshape(-1) for g in names]) if stage == groups.pp_rank
                    else torch.empty(sum(numels), dtype=dtype, device=device))
            dist.broadcast(flat.view(torch.uint8), src=dist.get_global_rank(groups.pp, stage), group=groups.pp)
            full = dict(zip(names, (t.view(s) for t, (_, s, _) in zip(flat.split(numels), shapes))))
        for g in names:
            yield from to_hf_tensors(g, full[g], dims).items()
        full = flat = None


class WeightSync:
    """Interface: ``push(model, groups) -> seconds`` after each optimizer update."""

    def push(self, model, groups: ParallelGroups) -> float:
        raise NotImplementedError


class SharedWeights(WeightSync):
    """The engine shares the trainer's parameters (native sampler): nothing to push."""

    def push(self, model, groups: ParallelGroups) -> float:
        return 0.0


class VLLMWeightPush(WeightSync):
    """Push new weights into vLLM engines: colocated ones on every rank, or one held by some ranks.

    Args:
        engine: the rank's engine (a ``ColocatedVLLMEngine`` or ``VLLMEngine``), else None.
        model_cfg: the policy's ``ModelConfig`` (for the HF-directory fallback).
        export_dir: where the HF-directory fallback writes (default: ``{engine.model_dir}-live``).
        bucket_bytes: see :func:`iter_hf_weight_buckets`.
    """

    def __init__(self, engine, *, model_cfg=None, export_dir: str | Path | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, **_ignored):
        self.engine, self.model_cfg = engine, model_cfg
        self.export_dir = Path(export_dir) if export_dir else None
        self.bucket_bytes = bucket_bytes
        self.pushes = 0

    def _in_place(self) -> bool:
        import torch.distributed as dist

        local = self.engine is not None and getattr(self.engine, "llm", None) is not None
        flag = [local if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(flag, src=0)  # every rank takes the same path (both are collectives)
        return bool(flag[0])

    def push(self, model, groups: ParallelGroups) -> float:
        from megatron_cropi.checkpoint import save_model_as_hf

        t0 = time.perf_counter()
        if self._in_place():
            stream = iter_hf_weight_buckets(model, groups, bucket_bytes=self.bucket_bytes)
            if self.engine is not None:
                self.engine.update_weights(stream)
            for _ in stream:  # a rank without an engine still takes part in the gathers
                pass
        else:
            base = self.export_dir or Path(str(getattr(self.engine, "model_dir", "policy")) + "-live")
            save_model_as_hf(model, groups, self.model_cfg, base, overwrite=True)
            if self.engine is not None:  # an isolated engine reads its directory at every generate
                self.engine.model_dir = str(base)
        self.pushes += 1
        return time.perf_counter() - t0


def weight_sync_for(engine, groups: ParallelGroups, *, model_cfg=None) -> WeightSync:
    """:class:`SharedWeights` for the native sampler or when no rank holds an engine (training on given
    rollouts only), :class:`VLLMWeightPush` otherwise. A collective: every rank must call it."""
    import torch.distributed as dist

    from megatron_cropi.rollout.native_sampler import NativeSampler

    flags = torch.tensor([engine is not None, isinstance(engine, NativeSampler)], dtype=torch.int32,
                         device=groups.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if not flags[0] or flags[1]:
        return SharedWeights()
    return VLLMWeightPush(engine, model_cfg=model_cfg)
