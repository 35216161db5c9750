"""The ``cropi`` command.

    cropi check-env [--json]              versions, devices, available backends
    cropi run CONFIG [--new-run]          the CROPI curriculum: warm-up, rollouts, stages (resumes)
    cropi run --dry-run CONFIG            validate config, parallel layout and paths
    cropi rollout CONFIG [--split S]      roll a prompt set out into a trajectory store (resumes)
    cropi score CONFIG [--checkpoint D]   projected POPI gradients of stored trajectories (resumes)
    cropi select CONFIG --checkpoint D    one selection at a checkpoint, as verl Parquet + slime JSONL (resumes)
    cropi train CONFIG                    plain GRPO on grpo.split: the full-data baseline (resumes)
    cropi status RUN_DIR [--json]         where a run is: stage, step, time, disk, last selection
    cropi export RUN_DIR --step N         a GRPO checkpoint of a run as an HF directory (any layout)
    cropi serve-scoring CONFIG            a run's external background scoring job (curriculum.background_scorer)

Every CONFIG may be followed by overrides ``key.path=value`` (YAML values, validated like the file),
and ``--print-config`` prints the resolved config (after ``extends:`` and overrides) as YAML.

Distributed subcommands run under torchrun (``torchrun --nproc-per-node N -m megatron_cropi.cli ...``).
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_cropi.commands.config_args import add_config_arguments, print_config, split_overrides

__all__ = ["main", "build_parser"]


def _cmd_check_env(args) -> int:
    from megatron_cropi.envcheck import collect_env, format_env

    info = collect_env()
    print(json.dumps(info, indent=2) if args.json else format_env(info))
    return 0


def _cmd_run(args) -> int:
    from megatron_cropi.commands.run import cmd_run

    return cmd_run(args)


def _cmd_rollout(args) -> int:
    from megatron_cropi.commands.rollout import cmd_rollout

    return cmd_rollout(args)


def _cmd_train(args) -> int:
    from megatron_cropi.commands.train import cmd_train

    return cmd_train(args)


def _cmd_score(args) -> int:
    from megatron_cropi.commands.score import cmd_score

    return cmd_score(args)


def _cmd_select(args) -> int:
    from megatron_cropi.commands.select import cmd_select

    return cmd_select(args)


def _cmd_status(args) -> int:
    from megatron_cropi.commands.status import cmd_status

    return cmd_status(args)


def _cmd_export(args) -> int:
    from megatron_cropi.commands.export import cmd_export

    return cmd_export(args)


def _cmd_serve_scoring(args) -> int:
    from megatron_cropi.commands.background_scorer import cmd_serve_scoring
    from megatron_cropi.run_config import load_run_config

    return cmd_serve_scoring(load_run_config(args.config, args.overrides or (), command="run"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cropi", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-env", help="versions, devices and available backends")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_check_env)
    p = sub.add_parser("run", help="run a CROPI curriculum (or validate it with --dry-run)")
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="validate config, layout and paths; run nothing")
    p.add_argument("--world-size", type=int, default=None, help="ranks of the intended launch (dry run)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node of the intended launch (dry run)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory of one GPU; the dry run fails when its per-GPU estimate exceeds it (default 80)")
    p.add_argument("--new-run", action="store_true",
                   help="start a new run in run.output_dir even if the config changed (old outputs moved aside)")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("rollout", help="roll a prompt set out into a trajectory store (resumes)")
    add_config_arguments(p)
    p.add_argument("--split", default=None, help="pool, val, test or check (default: rollout.split)")
    p.add_argument("--store", default=None, help="store directory (default: rollout.store_dir)")
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts of the split")
    p.add_argument("--repair", action="store_true", help="drop corrupt store parts and roll them out again")
    p.set_defaults(func=_cmd_rollout)
    p = sub.add_parser("train", help="plain GRPO on a prompt set: the full-data baseline (resumes)")
    add_config_arguments(p)
    p.add_argument("--steps", type=int, default=None, help="override grpo.steps")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("score", help="projected POPI gradients of stored trajectories at a checkpoint (resumes)")
    add_config_arguments(p)
    p.add_argument("--sets", default=None, help="comma-separated stores under run.output_dir/rollouts (default: "
                   "pool, val and target-*)")
    p.add_argument("--checkpoint", default=None, help="GRPO checkpoint (step_N) or HF directory of the policy")
    p.add_argument("--tag", default=None, help="features go to run.output_dir/features/TAG (default step<N>)")
    p.set_defaults(func=_cmd_score)
    p = sub.add_parser("select", help="score the pool at a checkpoint and write one selection as verl Parquet and "
                       "slime JSONL (resumes)")
    add_config_arguments(p)
    p.add_argument("--checkpoint", required=True, help="GRPO checkpoint (step_N, any TP/PP layout) or HF directory")
    p.add_argument("--out", default=None, help="output directory (default run.output_dir/select/<step_N|hf-NAME>)")
    p.add_argument("--stage", type=int, default=0, help="stage number of this selection (seeds its tie-breaks; "
                   "exclude_previous reads the earlier stages in --out)")
    p.set_defaults(func=_cmd_select)
    p = sub.add_parser("serve-scoring", help="the scoring job of a run with curriculum.background_scorer external: "
                       "scores and selects each stage it submits, on this job's own devices, until the run finishes")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_serve_scoring)
    p = sub.add_parser("status", help="where a run is: stage, step, time per phase, disk, last selection's health")
    p.add_argument("run_dir", help="run.output_dir of a `cropi run` (running or finished)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("export", help="a GRPO checkpoint of a run (checkpoints/step_N, any TP/PP layout) as an HF "
                       "directory, written atomically")
    p.add_argument("run_dir", help="run.output_dir of a `cropi run` (its config is read from state.json)")
    p.add_argument("--step", type=int, required=True, help="GRPO step N of checkpoints/step_N")
    p.add_argument("--out", default=None, help="HF directory to write (default RUN_DIR/hf/step_N)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size to load with (default: the run's)")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel size to load with (default: the run's)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the written tensors (default: the parameters')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_cropi.checkpoint.dist_ckpt import CheckpointError
    from megatron_cropi.config.loader import ConfigError
    from megatron_cropi.wiring import RunInputError
    from megatron_cropi.curriculum.state import ConfigChangedError
    from megatron_cropi.data.loaders import DataError
    from megatron_cropi.dryrun import DryRunError
    from megatron_cropi.influence.feature_store import FeatureStoreMismatch
    from megatron_cropi.parallel import LaunchError
    from megatron_cropi.rollout.store import StoreError
    from megatron_cropi.selection.policies import SelectionError
    from megatron_cropi.curriculum.scoring_service import ScoringServiceError
    from megatron_cropi.curriculum.background import BackgroundWaitError

    user_errors = (ConfigError, DryRunError, LaunchError, ConfigChangedError, SelectionError, RunInputError,
                   DataError, StoreError, FeatureStoreMismatch, CheckpointError, ScoringServiceError,
                   BackgroundWaitError)

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides, unknown = split_overrides(extra)
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        if getattr(args, "print_config", False):
            return print_config(args)
        code = args.func(args)
    except user_errors as err:
        print(f"cropi {args.command}: error: {err}", file=sys.stderr)
        return 2
    # a command that returned on every rank leaves together (see parallel.leave_together); on an exception no
    # barrier: the failing rank exits and torchrun stops the others
    from megatron_cropi.parallel import leave_together

    leave_together()
    return code


if __name__ == "__main__":
    sys.exit(main())
