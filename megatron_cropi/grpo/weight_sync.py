"""After each update, make the rollout engine sample from the new weights.

* :class:`SharedWeights`: the native Megatron sampler runs the trained ``GPTModel`` object itself
  (DDP keeps the module and only moves parameter storage into its buffers), so there is nothing to do.
* :class:`VLLMWeightPush`: the full HF-named tensors are reassembled from every TP/PP shard
  (:func:`megatron_cropi.checkpoint.megatron_to_hf_named_tensors`, one parameter at a time) and
  pushed into the *running* engine with its ``update_weights`` (``reload_weights`` in place, CPU GEMM
  re-pack, prefix-cache reset; no checkpoint on disk). An engine that cannot take weights in place
  (``isolate=True``: a fresh process per generate) gets an HF directory instead
  (:func:`~megatron_cropi.checkpoint.save_model_as_hf`, written atomically) that it reads next time.

Every rank must call :meth:`push` (the reassembly is a collective).
"""

from __future__ import annotations

import time
from pathlib import Path

from megatron_cropi.parallel import ParallelGroups

__all__ = ["WeightSync", "SharedWeights", "VLLMWeightPush", "weight_sync_for"]


class WeightSync:
    """Interface: ``push(model, groups) -> seconds`` after each optimizer update."""

    def push(self, model, groups: ParallelGroups) -> float:
        raise NotImplementedError


class SharedWeights(WeightSync):
    """The engine shares the trainer's parameters (native sampler): nothing to push."""

    def push(self, model, groups: ParallelGroups) -> float:
        return 0.0


class VLLMWeightPush(WeightSync):
    """Push new weights into a vLLM engine held by some ranks (None elsewhere).

    Args:
        engine: the ``VLLMEngine`` on the ranks that hold one, else None.
        model_cfg: the policy's ``ModelConfig`` (for the HF-directory fallback).
        export_dir: where the HF-directory fallback writes (default: ``{engine.model_dir}-live``).
        all_ranks_receive: every rank receives the full tensors (engines on several DP replicas);
            otherwise only global rank 0 does (one engine).
    """

    def __init__(self, engine, *, model_cfg=None, export_dir: str | Path | None = None, all_ranks_receive: bool = False):
        self.engine, self.model_cfg = engine, model_cfg
        self.export_dir = Path(export_dir) if export_dir else None
        self.all_ranks_receive = all_ranks_receive
        self.pushes = 0

    def _in_place(self) -> bool:
        import torch.distributed as dist

        local = self.engine is not None and getattr(self.engine, "llm", None) is not None
        flag = [local if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(flag, src=0)  # every rank takes the same path (both are collectives)
        return bool(flag[0])

    def push(self, model, groups: ParallelGroups) -> float:
        from megatron_cropi.checkpoint import megatron_to_hf_named_tensors, save_model_as_hf

        t0 = time.perf_counter()
        if self._in_place():
            named = list(megatron_to_hf_named_tensors(model, groups, dst=None if self.all_ranks_receive else 0))
            if self.engine is not None and named:
                self.engine.update_weights(named)
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
    import torch
    import torch.distributed as dist

    from megatron_cropi.grpo.rollouts import is_collective_engine

    flags = torch.tensor([engine is not None, engine is not None and is_collective_engine(engine)], dtype=torch.int32,
                         device=groups.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if not flags[0] or flags[1]:
        return SharedWeights()
    return VLLMWeightPush(engine, model_cfg=model_cfg, all_ranks_receive=groups.dp_size > 1)
