"""Training checkpoints through ``megatron.core.dist_checkpointing``: resume exactly, reshard on load.

One checkpoint is one directory, written under a temporary name and renamed when complete (a run
killed mid-save leaves a ``.tmp-*`` directory that is ignored and cleaned up, never a half checkpoint)::

    {root}/step_00000040/
        dist/           model (+ frozen reference) and optimizer, megatron-core sharded tensors
        meta.json       step, trainer state (data position, counters), LR-scheduler state, the
                        model's global parameter shapes and dimensions, the layout that saved it
        rng/tp{t}_pp{p}_dp{d}.pt   per-rank RNG states (Python, NumPy, torch, Megatron's tracker)

* Model tensors are saved with their global offsets (``model.sharded_state_dict()``), so they load
  into any TP/PP/DP layout of the same model, and (weights only) into the interleaved schedule's V chunks
  per stage (a chunk's keys carry its global layer offsets: ``get_transformer_layer_offset(cfg, vp_stage)``).
* The distributed optimizer's state is saved ``fully_reshardable`` (canonical per-parameter Adam
  moments), so it too loads into another TP/PP/DP layout; the non-distributed optimizer's sharded
  state dict is layout-independent as well. RNG states are restored only when the layout is the
  same (another layout's rank streams have no counterpart; model init and sampling noise do not
  depend on them).
* Before anything is read, the checkpoint's global parameter shapes are compared with the model's;
  a checkpoint of another model raises :class:`CheckpointError` naming the parameter, both shapes and
  the dimensions that differ.

megatron-core 0.16 with torch's own Adam (no Transformer Engine / Apex, e.g. every CPU run) cannot
load a distributed-optimizer checkpoint into a fresh optimizer as shipped: ``state_dict()`` needs an
allocated state, the loader copies a ``step`` key the checkpoint does not carry, and the restored
``step`` tensor is shared by every parameter (Adam increments it once per parameter per step).
:func:`_prepare_optimizer_for_load` / :func:`_finish_optimizer_load` work around the three.
"""

from __future__ import annotations

import json
import logging
import os
import random
import queue
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_cropi.checkpoint.optimizer_state import (finish_optimizer_load, optimizer_has_state,
                                                       prepare_optimizer_for_load, reload_main_params)
from megatron_cropi.model.params import param_layouts
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.utils.atomic import atomic_write_json, fsync_dir
from megatron_cropi.utils.rank_zero import on_rank0, share_from_rank0

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "read_checkpoint_meta",
    "model_dimensions", "reload_main_params", "FORMAT_VERSION",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
OPTIM_SHARDING = "fully_reshardable"
_STEP_DIR = re.compile(r"step_(\d{8})")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model it is loaded into."""


def _unwrap(model):
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def _modules(model) -> list:  # the interleaved schedule's chunks (a list), or the one stage
    return [_unwrap(m) for m in model] if isinstance(model, (list, tuple)) else [_unwrap(model)]


def model_dimensions(model) -> dict[str, Any]:
    """The architecture numbers of a ``GPTModel`` that a checkpoint must share with it."""
    m = _modules(model)[0]  # every chunk holds the global sizes
    c = m.config
    return {
        "num_layers": c.num_layers, "hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads, "num_query_groups": c.num_query_groups or c.num_attention_heads,
        "kv_channels": c.kv_channels, "vocab_size": int(getattr(m, "vocab_size", 0)),
        "tie_word_embeddings": bool(getattr(m, "share_embeddings_and_output_weights", False)),
        "gated_linear_unit": bool(c.gated_linear_unit), "add_qkv_bias": bool(c.add_qkv_bias),
    }


def _global_shapes(model, groups: ParallelGroups) -> dict[str, list[int]]:
    """``{global name: global shape}`` of the whole model (gathered over every rank)."""
    mine = {lay.global_name: list(lay.global_shape) for m in _modules(model)
            for lay in param_layouts(m, groups).values()}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    out: dict[str, list[int]] = {}
    for part in parts:
        out.update(part)
    return dict(sorted(out.items()))


def _rng_file(ckpt: Path, groups: ParallelGroups) -> Path:
    return ckpt / "rng" / f"tp{groups.tp_rank}_pp{groups.pp_rank}_dp{groups.dp_rank}.pt"


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, reference, *, is_loading: bool) -> dict:
    chunks = _modules(model)  # V chunks: one sharded state dict each, their keys global
    sd: dict[str, Any] = {"model": {f"chunk{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}
                          if len(chunks) > 1 else chunks[0].sharded_state_dict()}
    if optimizer is not None:
        if is_loading:
            prepare_optimizer_for_load(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd["model"], is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIM_SHARDING})
    if reference is not None:
        sd["reference"] = _unwrap(reference).sharded_state_dict(prefix="reference.")
    return sd


def _in_process_write_queue() -> None:
    """Give megatron-core's checkpoint writer an in-process results queue.

    Our saves are synchronous (``dist_checkpointing.save`` without ``async_sharded_save``): the writer's
    save function runs in this process, forks its file writers and puts their results on the queue
    here, and finalising reads them here. megatron-core's default is a queue served by a
    ``multiprocessing`` manager, which an asynchronous save (run in another process) needs: starting it
    spawns a Python process that imports the trainer's modules (about 2 s per process on the 2-core
    CPU machine, more with several ranks), and a killed trainer orphans it. A plain queue needs neither.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    if getattr(fsa, "_results_queue", "absent") is None:
        fsa._results_queue = queue.Queue()


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model,
    groups: ParallelGroups,
    optimizer=None,
    scheduler=None,
    reference=None,
    state: dict | None = None,
    keep_last: int = 0,
) -> Path:
    """Save ``{root}/step_{step:08d}`` atomically; every rank must call it.

    Args:
        model: this rank's model stage (bare or DDP-wrapped).
        optimizer: the megatron-core optimizer (optional).
        scheduler: the ``OptimizerParamScheduler`` (optional).
        reference: a frozen reference model saved alongside (optional).
        state: JSON-serialisable trainer state (data position, counters).
        keep_last: afterwards delete all but the newest ``keep_last`` checkpoints (0: keep all).

    Returns:
        The checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{share_from_rank0(uuid.uuid4().hex[:8])}"

    def make_tmp():
        (tmp / "dist").mkdir(parents=True, exist_ok=False)
        (tmp / "rng").mkdir()

    on_rank0(make_tmp)
    shapes = _global_shapes(model, groups)
    # before the first optimizer step (e.g. every step so far skipped) the state is empty: a fresh
    # optimizer is then exactly what loading must produce, so none is saved
    optimizer_state = optimizer is not None and optimizer_has_state(optimizer, groups.device)
    _in_process_write_queue()
    dist_checkpointing.save(_sharded_state(model, optimizer if optimizer_state else None, reference, is_loading=False),
                            str(tmp / "dist"))
    torch.save(_rng_state(), _rng_file(tmp, groups))
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {
            "format_version": FORMAT_VERSION, "step": int(step), "state": state or {},
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "has_optimizer": optimizer is not None, "optimizer_state": optimizer_state,
            "has_reference": reference is not None,
            "optimizer_sharding": OPTIM_SHARDING, "dimensions": model_dimensions(model), "parameters": shapes,
            "layout": {"tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size},
        }
        atomic_write_json(tmp / "meta.json", meta)
        if final.exists():  # a re-save of the same step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if keep_last:
            for old in _complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def _complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step_*") if _STEP_DIR.fullmatch(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none; temp dirs are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = _complete_checkpoints(root)
    return found[-1] if found else None


def read_checkpoint_meta(ckpt: str | Path) -> dict:
    """``meta.json`` of a checkpoint directory.

    Raises:
        CheckpointError: not a complete checkpoint (no ``meta.json``) or an unknown format version.
    """
    path = Path(ckpt) / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint (no meta.json)")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return meta


def _check_shapes(ckpt: Path, meta: dict, model, groups: ParallelGroups) -> None:
    theirs = {k: list(v) for k, v in meta["parameters"].items()}
    ours = _global_shapes(model, groups)
    problems = []
    dims_t, dims_o = meta.get("dimensions", {}), model_dimensions(model)
    diffs = [f"{k}: checkpoint {dims_t[k]} vs model {dims_o[k]}" for k in dims_o if k in dims_t and dims_t[k] != dims_o[k]]
    for name in ours:
        if name not in theirs:
            problems.append(f"parameter {name!r} is not in the checkpoint")
        elif theirs[name] != ours[name]:
            problems.append(f"parameter {name!r} has shape {tuple(theirs[name])} in the checkpoint, "
                            f"{tuple(ours[name])} in the model")
    problems += [f"checkpoint parameter {name!r} is not in the model" for name in theirs if name not in ours]
    if problems or diffs:
        detail = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise CheckpointError(
            f"{ckpt}: the checkpoint is of another model shape ({'; '.join(diffs) or 'parameters differ'}): {detail}")


def load_checkpoint(
    ckpt: str | Path,
    *,
    model,
    groups: ParallelGroups,
    optimizer=None,
    scheduler=None,
    reference=None,
    restore_rng: bool = True,
    weights_only: bool = False,
) -> dict:
    """Load a checkpoint into this rank's model (and optimizer, scheduler, reference); every rank calls it.

    Whatever is loaded, the optimizer's main weights end equal to the model's loaded weights: a bf16/fp16
    model's optimizer (distributed or not) keeps its own fp32 copy and writes that copy back into the
    model at every step, so a copy left at the old weights would undo the load at the first step.

    Args:
        ckpt: a checkpoint directory (``.../step_N``).
        model: this rank's stage, or the interleaved schedule's list of its V chunks (weights only).
        optimizer: load the optimizer state too (the checkpoint must have one unless ``weights_only``).
        reference: load the saved reference model into this module (the checkpoint must have one).
        restore_rng: restore this rank's RNG states when the checkpoint's layout is this run's.
        weights_only: read the model weights only; ``optimizer`` (if given) keeps its moments and
            step but takes its main weights from the loaded model (``reload_model_params``).

    Returns:
        ``meta.json``'s content (``meta["state"]`` is the trainer state saved with it).

    Raises:
        CheckpointError: incomplete checkpoint, another model shape, or a missing optimizer/reference.
    """
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    chunks = _modules(model)
    if len(chunks) > 1 and (optimizer is not None or reference is not None):
        raise ValueError(f"{len(chunks)} model chunks (interleaved schedule) take weights only, no optimizer/reference")
    meta = read_checkpoint_meta(ckpt)
    _check_shapes(ckpt, meta, model, groups)
    if optimizer is not None and not weights_only and not meta.get("has_optimizer"):
        raise CheckpointError(f"{ckpt}: has no optimizer state; load it without the optimizer")
    if reference is not None and not meta.get("has_reference"):
        raise CheckpointError(f"{ckpt}: has no reference model")
    # saved before the first optimizer step, the fresh optimizer is that state (all but its main weights)
    read_optimizer = optimizer is not None and not weights_only and meta.get("optimizer_state", True)
    sharded = _sharded_state(model, optimizer if read_optimizer else None, reference, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(ckpt / "dist"))
    for v, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded["model"][f"chunk{v}"])
    if read_optimizer:  # the reshardable state carries the fp32 main weights themselves
        optimizer.load_state_dict(loaded["optimizer"])
        finish_optimizer_load(optimizer)
    elif optimizer is not None:
        reload_main_params(optimizer)
    if reference is not None:
        _unwrap(reference).load_state_dict({k.removeprefix("reference."): v for k, v in loaded["reference"].items()})
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    same_layout = meta["layout"] == {"tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size}
    if restore_rng and same_layout and _rng_file(ckpt, groups).is_file():
        _set_rng_state(torch.load(_rng_file(ckpt, groups), weights_only=False))
    elif restore_rng and not same_layout and dist.get_rank() == 0:
        log.info("%s: saved with layout %s, loading into %s: RNG states not restored", ckpt, meta["layout"],
                 {"tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size})
    dist.barrier()
    return meta
