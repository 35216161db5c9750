"""``cropi train CONFIG``: plain GRPO on one prompt set (``grpo.split``, the pool by default) for
``grpo.steps`` steps: the full-data baseline every CROPI comparison needs.

    cropi train examples/configs/tiny_cpu.yaml                       # one process
    torchrun --nproc-per-node 2 -m megatron_cropi.cli train CONFIG   # TP/PP/DP from the config

Everything goes under ``{run.output_dir}/train/`` (so a baseline and a CROPI run can share a config
and an output directory): ``checkpoints/step_N`` (every ``grpo.checkpoint.save_interval`` steps and at
the end), ``tensorboard/`` (``train/*`` every step, ``eval/*`` every ``grpo.eval_interval`` steps) and
``eval.json`` (the evaluation history). A rerun resumes from the newest checkpoint.

Initial weights (the same starting point as the curriculum): ``rollout.checkpoint`` (an HF directory)
if set, else the warm-up checkpoint ``{run.output_dir}/warmup/hf`` (made by ``cropi run`` or, when it
does not exist and ``curriculum.warmup.enabled`` with synthetic data, by this command, at the same
place), else a seeded random initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from megatron_cropi.checkpoint.dist_ckpt import CheckpointError, latest_checkpoint
from megatron_cropi.curriculum.warmup import run_warmup
from megatron_cropi.data.loaders import DataError
from megatron_cropi.layout import RunLayout
from megatron_cropi.metrics import MetricsLogger
from megatron_cropi.commands.config_args import load_config
from megatron_cropi.utils.atomic import atomic_write_json
from megatron_cropi.wiring import PolicyRuntime, initial_weights, setup_run

__all__ = ["run_train", "cmd_train"]

log = logging.getLogger(__name__)


def _start_weights(cfg, layout: RunLayout, groups, tokenizer, prompts, metrics) -> str | None:
    """:func:`~megatron_cropi.wiring.initial_weights`, making the warm-up first when it is enabled for
    synthetic data and not there yet (at the same place ``cropi run`` makes it)."""
    weights = initial_weights(cfg, layout)
    if weights is None and cfg.curriculum.warmup.enabled and cfg.data.kind == "synthetic":
        info = run_warmup(cfg, groups, tokenizer, prompts, layout.warmup_hf, metrics=metrics, log=log.info)
        log.info("warm-up done: %d steps, greedy target accuracy %.3f", info["steps"], info["greedy_val"])
        weights = str(layout.warmup_hf)
    return weights


def _split(prompts, name: str) -> list:
    if name == "val":
        return [p for recs in prompts.targets.values() for p in recs]
    return list(getattr(prompts, name))


def run_train(cfg) -> dict:
    """Train, evaluate, checkpoint and resume as described in the module docstring; return a summary."""
    grpo_cfg = cfg.grpo
    layout = RunLayout(cfg.run.output_dir)
    out = layout.train
    groups, prompts, tokenizer = setup_run(cfg)
    train_set = _split(prompts, grpo_cfg.split)
    if not train_set:
        raise ValueError(f"grpo.split {grpo_cfg.split!r} has no prompts")
    eval_set = _split(prompts, grpo_cfg.eval_split)[: grpo_cfg.eval_max_prompts] if grpo_cfg.eval_split and grpo_cfg.eval_interval else []
    metrics = MetricsLogger(out.tensorboard, enabled=groups.is_metrics_rank)
    hf_dir = _start_weights(cfg, layout, groups, tokenizer, prompts, metrics)
    runtime = PolicyRuntime(cfg, groups, tokenizer, hf_dir=hf_dir, total_steps=grpo_cfg.steps, metrics=metrics,
                            checkpoint_dir=Path(grpo_cfg.checkpoint.dir) if grpo_cfg.checkpoint.dir else out.checkpoints)
    trainer = runtime.trainer
    trainer.set_prompts(train_set)
    history_path = out.train_history
    history: list[dict] = []
    start = grpo_cfg.checkpoint.load or (latest_checkpoint(trainer.checkpoint_dir) if grpo_cfg.checkpoint.resume else None)
    if start:
        trainer.load(start)
        if history_path.is_file():
            history = [h for h in json.loads(history_path.read_text()) if h["step"] <= trainer.step_count]
        log.info("resumed from %s at step %d", start, trainer.step_count)
    writer = dist.get_rank() == 0

    def evaluate():
        res = trainer.evaluate(eval_set, samples=grpo_cfg.eval_samples, seed=cfg.run.seed)
        metrics.log(trainer.step_count, res, prefix="eval")
        history.append({"step": trainer.step_count, **res})
        if writer:
            atomic_write_json(history_path, history)

    t0 = time.perf_counter()
    last = {}
    try:
        if eval_set and trainer.step_count == 0 and not history:
            evaluate()
        while trainer.step_count < grpo_cfg.steps:
            last = trainer.step()
            if eval_set and (trainer.step_count % grpo_cfg.eval_interval == 0 or trainer.step_count == grpo_cfg.steps):
                evaluate()
            if writer and trainer.step_count % 10 == 0:
                log.info("step %d: reward %.3f kl %.4f", trainer.step_count, last["reward"], last.get("kl", 0.0))
        saved = trainer.save_unless_current()
    finally:
        runtime.close()
    return {"output_dir": str(out.root), "steps": trainer.step_count, "skipped_steps": trainer.skipped_steps,
            "checkpoint": str(saved), "seconds": time.perf_counter() - t0,
            "last": {k: last[k] for k in ("reward", "pass_rate", "kl", "entropy", "grad_norm") if k in last},
            "eval": history[-1] if history else None}


def cmd_train(args) -> int:
    """The ``cropi train`` subcommand: prints the summary as JSON on rank 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    cfg = load_config(args)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, steps=args.steps))
    try:
        summary = run_train(cfg)
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as err:
        print(f"cropi train: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2, default=str))
    return 0
