"""The config arguments every config-taking subcommand shares: ``CONFIG [key.path=value ...]``,
``--print-config``.

    cropi run examples/configs/tiny_cpu.yaml grpo.optim.lr=3e-4 selection.ratio=0.2 --dry-run
    cropi train CONFIG run.output_dir=/scratch/x --print-config     # the resolved config as YAML

Overrides may come before or after the options; each is validated like the file (an unknown key or a
bad value is an error naming the key, the value and the override).
"""

from __future__ import annotations

import argparse

__all__ = ["add_config_arguments", "split_overrides", "load_config", "print_config"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``config``, ``overrides`` (``KEY=VALUE ...``) and ``--print-config`` to a subcommand."""
    parser.add_argument("config", help="YAML run config (may `extends:` another file)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                        help="override a config key, e.g. grpo.optim.lr=3e-4 data.pool[0].limit=100 "
                             "selection.pass_rate_band=[0.1,0.9]; values are YAML")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (after extends and overrides) as YAML and exit")


def split_overrides(extra: list[str]) -> tuple[list[str], list[str]]:
    """``(overrides, unrecognised)`` of the arguments argparse left over: ``key=value`` tokens that
    came after an option are overrides, anything else is unrecognised."""
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    return overrides, [a for a in extra if a not in overrides]


def load_config(args):
    """The :class:`~megatron_cropi.run_config.RunConfig` of ``args.config`` with ``args.overrides``, validated
    for the subcommand ``args.command`` (only ``score`` and ``select`` accept the interleaved schedule)."""
    from megatron_cropi.run_config import load_run_config

    return load_run_config(args.config, getattr(args, "overrides", None) or (),
                           command=getattr(args, "command", None) or "run")


def print_config(args) -> int:
    """``--print-config``: the resolved config as YAML on stdout; exit status 0."""
    from megatron_cropi.run_config import config_to_yaml

    print(config_to_yaml(load_config(args)), end="")
    return 0
