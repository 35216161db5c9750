"""``cropi run --dry-run``: check config, parallel layout and paths without building anything.

Nothing is created, no process group is started and no GPU is needed, so it runs on a login node or
in CI for configs meant for 8×H100 nodes.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_cropi.config.schema import RunConfig
from megatron_cropi.parallel import LaunchError, check_layout

__all__ = ["DryRunError", "dry_run"]


class DryRunError(ValueError):
    """The run as configured cannot start; the message lists every problem found."""


def _writable_dir(path: Path) -> tuple[bool, str]:
    """Whether ``path`` exists as a writable directory or could be created (nearest ancestor writable)."""
    p = path.resolve()
    if p.exists():
        if not p.is_dir():
            return False, f"{path} exists and is not a directory"
        return os.access(p, os.W_OK), f"{path} is not writable"
    for parent in p.parents:
        if parent.exists():
            ok = parent.is_dir() and os.access(parent, os.W_OK)
            return ok, f"{path} cannot be created: {parent} is not a writable directory"
    return False, f"{path} has no existing ancestor"


def dry_run(cfg: RunConfig, *, world_size: int | None = None) -> dict:
    """Validate what a launch of ``cfg`` on ``world_size`` ranks needs; return a summary.

    Args:
        cfg: a loaded (hence type- and range-checked) run config.
        world_size: ranks of the launch; default ``$WORLD_SIZE`` or TP×PP.

    Raises:
        DryRunError: listing every layout or path problem.
    """
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 0)) or tp * pp
    problems: list[str] = []
    dp = None
    try:
        dp = check_layout(world_size, tp, pp)
    except LaunchError as err:
        problems.append(str(err))
    problems += cfg.model.layout_errors(tp, pp)
    ok, why = _writable_dir(cfg.output_dir)
    if not ok:
        problems.append(f"run.output_dir: {why}")
    if problems:
        raise DryRunError("dry run found problems:\n  - " + "\n  - ".join(problems))
    n_params = cfg.model.num_parameters()
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.params_dtype]
    return {
        "world_size": world_size,
        "layout": {"tp": tp, "pp": pp, "dp": dp},
        "model": {
            "preset": cfg.model.preset,
            "parameters": n_params,
            "layers_per_stage": cfg.model.transformer["num_layers"] // pp,
            "param_bytes_per_rank": n_params * bytes_per // (tp * pp),
        },
        "output_dir": str(cfg.output_dir),
    }
