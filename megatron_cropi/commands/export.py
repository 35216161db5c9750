"""``cropi export RUN_DIR --step N``: a GRPO checkpoint of a run as an HF transformers directory.

    cropi export runs/tiny_cpu --step 6                                   # -> runs/tiny_cpu/hf/step_6
    cropi export runs/tiny_cpu --step 6 --out /models/tiny_step6 --overwrite
    torchrun --nproc-per-node 8 -m megatron_cropi.cli export RUN_DIR --step 400 --tp 4   # any layout

The checkpoint ``RUN_DIR/checkpoints/step_NNNNNNNN`` of GRPO step N (saved in any TP/PP/DP layout: loading reshards it) is read
into a policy built from the run's own configuration (``state.json["config"]``, read through today's
schema), on the layout of this launch: ``--tp``/``--pp`` (default: the run's) with the world size as
TP×PP×DP. The weights are then gathered onto rank 0 and written with
:func:`~megatron_cropi.checkpoint.save_model_as_hf`, which streams the shards into a temporary directory
and renames it into place only when complete: an interrupted export leaves no partial output.

When the run started from an HF model (``rollout.checkpoint``), its tokenizer and generation files and
the config keys this package does not own (token ids, ...) are carried into the export, so vLLM or
transformers can serve it as is. The export of the run's last step holds the same tensors as the run's
``final_hf/``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

__all__ = ["cmd_export", "export_checkpoint", "stored_run_config", "checkpoint_of_step"]

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def stored_run_config(run_dir: str | Path):
    """The :class:`~megatron_cropi.run_config.RunConfig` a run's finished work was made with.

    Raises:
        FileNotFoundError: ``RUN_DIR/state.json`` is missing or holds no config.
    """
    from megatron_cropi.config.loader import from_dict, prune_unknown_keys
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.run_config import RunConfig

    state_path = RunLayout(run_dir).state
    try:
        stored = json.loads(state_path.read_text()).get("config")
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{state_path}: cannot be read ({err}); RUN_DIR must be the run.output_dir of a "
                                "`cropi run`") from None
    if not stored:
        raise FileNotFoundError(f"{state_path}: holds no 'config'; RUN_DIR must be the run.output_dir of a `cropi run`")
    return from_dict(RunConfig, prune_unknown_keys(RunConfig, stored))


def checkpoint_of_step(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step_NNNNNNNN`` of GRPO step ``step``.

    Raises:
        FileNotFoundError: there is no complete checkpoint of that step; the message lists those there are.
    """
    from megatron_cropi.layout import RunLayout

    root = RunLayout(run_dir).checkpoints
    steps = {int(m.group(1)): p for p in (root.glob("step_*") if root.is_dir() else [])
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "meta.json").is_file()}
    if step in steps:
        return steps[step]
    raise FileNotFoundError(f"--step {step}: no complete checkpoint of step {step} in {root} (steps kept: "
                            f"{', '.join(map(str, sorted(steps))) or 'none'}; grpo.checkpoint.keep_last sets how "
                            "many are kept)")


def export_checkpoint(run_dir: str | Path, step: int, out: str | Path | None = None, *, tp: int | None = None,
                      pp: int | None = None, dtype: str | None = None, overwrite: bool = False) -> dict:
    """Write checkpoint ``step`` of the run in ``run_dir`` as an HF directory; every rank calls it.

    Args:
        out: the HF directory to write (default ``RUN_DIR/hf/step_N``).
        tp, pp: the layout to load into (default: the run's ``parallel`` sizes).
        dtype: ``bf16``, ``fp16`` or ``fp32`` (default: the parameters' dtype).
        overwrite: replace an existing ``out`` (it is replaced only once the new one is complete).

    Returns:
        ``{"checkpoint", "out", "step", "layout"}``.
    """
    import dataclasses

    import torch

    from megatron_cropi.checkpoint import save_model_as_hf
    from megatron_cropi.checkpoint.dist_ckpt import load_checkpoint, read_checkpoint_meta
    from megatron_cropi.model.provider import build_gpt_model
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.wiring import configure_threads

    cfg = stored_run_config(run_dir)
    ckpt = checkpoint_of_step(run_dir, step)
    meta = read_checkpoint_meta(ckpt)
    out = Path(out) if out else Path(run_dir) / "hf" / f"step_{step}"
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    if not overwrite and out.exists():
        raise FileExistsError(f"--out {out}: already exists; pass --overwrite to replace it")
    tp = tp or cfg.parallel.tensor_model_parallel_size
    pp = pp or cfg.parallel.pipeline_model_parallel_size
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    init_distributed(allow_single=True)
    configure_threads(cfg.run.num_threads)
    groups = build_parallel_groups(tp, pp, seed=cfg.run.seed)
    model = build_gpt_model(cfg.model, groups)  # every parameter is overwritten by the checkpoint
    load_checkpoint(ckpt, model=model, groups=groups, restore_rng=False)
    source = cfg.rollout.checkpoint or None
    if source and not (Path(source) / "config.json").is_file():
        source = None  # the start model moved: the export is complete without its side files
    save_model_as_hf(model, groups, cfg.model, out, source_hf_dir=source, overwrite=overwrite,
                     dtype=getattr(torch, _DTYPES[dtype]) if dtype else None)
    return {"checkpoint": str(ckpt), "out": str(out), "step": int(meta["step"]),
            "layout": {"tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size},
            "saved_layout": meta.get("layout")}


def cmd_export(args) -> int:
    """The ``cropi export`` subcommand: prints ``{"checkpoint", "out", "step", ...}`` as JSON on rank 0."""
    import torch.distributed as dist

    try:
        result = export_checkpoint(args.run_dir, args.step, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                   overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"cropi export: error: {err}", file=sys.stderr)
        return 2
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    return 0
