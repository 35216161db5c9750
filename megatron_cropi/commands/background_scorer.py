"""The background scorer's process (``curriculum.background_scoring``), started by ``cropi run``:

    python -m megatron_cropi.commands.background_scorer CONFIG.yaml JOB.json

It loads the run config (the parent's resolved one), then does what
:func:`megatron_cropi.curriculum.background.run_job` says once the parent writes ``JOB.json``. Not a
user command: it dies with the process that started it.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from megatron_cropi.curriculum.background import die_with_parent, run_job

    die_with_parent()  # first: a parent killed during the heavy imports below takes this process with it
    from megatron_cropi.run_config import load_run_config

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m megatron_cropi.commands.background_scorer CONFIG.yaml JOB.json", file=sys.stderr)
        return 2
    run_job(load_run_config(argv[0]), Path(argv[1]), log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
