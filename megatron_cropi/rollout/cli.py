"""``cropi rollout CONFIG``: the rollout subcommand's body (the parser entry lives in ``cli.py``).

One process for the vLLM engine or a TP=1 native run; ``torchrun --nproc-per-node N -m
megatron_cropi.cli rollout CONFIG`` for a native run with TP > 1 or data parallelism. Prints the
:class:`~megatron_cropi.rollout.runner.RolloutSummary` as JSON on rank 0; exit status 0 when the
store is complete, 2 on bad input (config, data, store) with the error on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

__all__ = ["cmd_rollout"]


def cmd_rollout(args) -> int:
    from megatron_cropi.config.schema import load_run_config
    from megatron_cropi.data.loaders import DataError
    from megatron_cropi.rollout.runner import run_rollout
    from megatron_cropi.rollout.store import StoreError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_run_config(args.config)
    try:
        summary = run_rollout(cfg, split=args.split, store_dir=args.store, limit=args.limit, repair=args.repair)
    except (DataError, StoreError, ValueError, FileNotFoundError) as err:
        print(f"cropi rollout: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dataclasses.asdict(summary), indent=2, default=str))
    return 0
