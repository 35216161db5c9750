"""``cropi run CONFIG``: the whole curriculum (resumes), or ``--dry-run`` to validate it without running."""

from __future__ import annotations

import json

from megatron_cropi.curriculum.controller import run_curriculum
from megatron_cropi.dryrun import dry_run
from megatron_cropi.commands.config_args import load_config

__all__ = ["cmd_run"]


def cmd_run(args) -> int:
    """Print the dry run's summary, or run the curriculum and print its final summary as one JSON line."""
    cfg = load_config(args)
    if args.dry_run:
        summary = dry_run(cfg, world_size=args.world_size, gpus_per_node=args.gpus_per_node,
                          gpu_memory_gib=args.gpu_memory_gib)
        print(json.dumps(summary, indent=2))
        for line in summary.get("estimate", {}).get("text", []):  # time and disk, with their assumptions
            print(line)
        print(f"dry run OK: {args.config}")
        return 0
    summary = run_curriculum(cfg, new_run=args.new_run)
    final = summary.get("final", {})
    if final:
        print(json.dumps({"output_dir": summary.get("output_dir"), "final": final,
                          "timing_seconds": summary.get("timing_seconds")}))
    return 0
