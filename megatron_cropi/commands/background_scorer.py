"""The background scorer's process (``curriculum.background_scoring``, ``background_scorer: child``),
started by ``cropi run``:

    python -m megatron_cropi.commands.background_scorer CONFIG.yaml JOB.json

It loads the run config (the parent's resolved one), then does what
:func:`megatron_cropi.curriculum.scoring_service.run_job` says once the parent writes ``JOB.json``. Not a
user command: it dies with the process that started it. (``cropi serve-scoring`` is the external scoring
job's command: :func:`cmd_serve_scoring`.)
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["cmd_serve_scoring", "main"]


def main(argv: list[str] | None = None) -> int:
    from megatron_cropi.curriculum.background import die_with_parent

    die_with_parent()  # first: a parent killed during the heavy imports below takes this process with it
    from megatron_cropi.curriculum.scoring_service import run_job
    from megatron_cropi.run_config import load_run_config

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m megatron_cropi.commands.background_scorer CONFIG.yaml JOB.json", file=sys.stderr)
        return 2
    run_job(load_run_config(argv[0]), Path(argv[1]), log=lambda msg: print(msg, flush=True))
    return 0


def cmd_serve_scoring(cfg) -> int:
    """``cropi serve-scoring CONFIG``: serve the run's background scoring jobs until it has finished
    (:func:`megatron_cropi.curriculum.scoring_service.serve`)."""
    from megatron_cropi.curriculum.scoring_service import serve
    from megatron_cropi.wiring import RunInputError

    if not (cfg.curriculum.background_scoring and cfg.curriculum.background_scorer == "external"):
        raise RunInputError("cropi serve-scoring serves runs with curriculum.background_scoring true and "
                            f"curriculum.background_scorer external; this config has background_scoring "
                            f"{cfg.curriculum.background_scoring}, background_scorer {cfg.curriculum.background_scorer}")
    serve(cfg, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
