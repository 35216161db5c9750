"""``cropi score CONFIG``: projected POPI gradients of stored trajectories at a checkpoint.

    cropi score CONFIG [--sets pool,val] [--checkpoint DIR] [--tag NAME]
    torchrun --nproc-per-node 4 -m megatron_cropi.cli score CONFIG        # any TP/PP/DP layout
    torchrun --nproc-per-node 2 -m megatron_cropi.cli score CONFIG parallel.pipeline_model_parallel_size=2 \
        model.transformer.virtual_pipeline_model_parallel_size=2          # the interleaved schedule

For each set, the trajectory store ``{run.output_dir}/rollouts/{set}`` (written by ``cropi rollout`` or
``cropi run``) is scored into the feature store ``{run.output_dir}/features/{tag}/{set}``. The policy
comes from ``--checkpoint`` (a GRPO checkpoint directory ``.../step_N`` or an HF directory), else
``rollout.checkpoint``, else the warm-up's HF export. A killed run, restarted, skips the rows already
written; a feature store made at another checkpoint or with another projector is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.distributed as dist

from megatron_cropi.checkpoint.dist_ckpt import load_checkpoint, read_checkpoint_meta
from megatron_cropi.curriculum.faults import fault_point
from megatron_cropi.influence.scale_out import score_store_sharded
from megatron_cropi.influence.stores import PolicyScorer, score_store
from megatron_cropi.layout import RunLayout
from megatron_cropi.projection.config import build_projector
from megatron_cropi.commands.config_args import load_config
from megatron_cropi.wiring import build_scoring_model, initial_weights, pad_id_of, setup_run

__all__ = ["cmd_score", "score_sets", "load_policy_scorer"]


def _policy_source(cfg, checkpoint: str | None) -> tuple[str | None, str | None]:
    """``(hf_dir, dist_checkpoint_dir)`` of the policy to score with."""
    if checkpoint:
        path = Path(checkpoint)
        if (path / "meta.json").exists():
            return None, str(path)
        if (path / "config.json").exists():
            return str(path), None
        raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a GRPO checkpoint (meta.json) nor an HF "
                                "directory (config.json)")
    return initial_weights(cfg, RunLayout(cfg.run.output_dir)), None


def load_policy_scorer(cfg, groups, tokenizer, checkpoint: str | None) -> PolicyScorer:
    """The policy at ``checkpoint`` (a GRPO checkpoint ``.../step_N`` saved in any TP/PP layout, or an HF
    directory; None: the default of :func:`_policy_source`) on this rank's layout, ready to score: one
    module per stage, or under the interleaved schedule the stage's V chunks (:func:`build_scoring_model`)."""
    hf_dir, ckpt = _policy_source(cfg, checkpoint)
    model = build_scoring_model(cfg, groups, hf_dir=hf_dir)
    step = 0
    if ckpt:
        step = int(read_checkpoint_meta(ckpt)["step"])
        load_checkpoint(ckpt, model=model, groups=groups, restore_rng=False)
    return PolicyScorer(model, groups, build_projector(cfg.projection), cfg.scoring,
                        projection_seed=cfg.projection.seed, checkpoint_step=step,
                        pad_id=pad_id_of(tokenizer), progress=cfg.rollout.progress)


def score_sets(cfg, sets: list[str], *, checkpoint: str | None = None, tag: str | None = None,
               fault=None) -> dict:
    """Score every named set; return ``{set: ScoreStats as dict}`` (identical on every rank)."""
    layout = RunLayout(cfg.run.output_dir)
    groups, _, tokenizer = setup_run(cfg)
    scorer = load_policy_scorer(cfg, groups, tokenizer, checkpoint)
    step = scorer.checkpoint_step
    results = {}
    for name in sets:
        out = layout.features(tag or f"step{step}", name)
        if name == "pool" and cfg.scoring.scale_out:  # shards per replica, a shared queue
            stats = score_store_sharded(layout.rollouts(name), out, scorer, on_unit=fault)
        else:
            stats = score_store(layout.rollouts(name), out, scorer, on_chunk=fault)
        results[name] = {**dataclasses.asdict(stats), "features": str(out),
                         "seconds_per_prompt": stats.seconds_per_prompt}
    return results


def cmd_score(args) -> int:
    cfg = load_config(args)
    root = RunLayout(cfg.run.output_dir).rollouts_root
    if args.sets:
        sets = [s for s in args.sets.split(",") if s]
    else:  # every store of a prompt set that is scored: the pool and the target sets
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
        sets = [s for s in present if s in ("pool", "val") or s.startswith("target-")]
    if not sets:
        raise FileNotFoundError(f"no trajectory store under {root}; run `cropi rollout {args.config}` first")
    results = score_sets(cfg, sets, checkpoint=args.checkpoint, tag=args.tag,
                         fault=lambda: fault_point("score:chunk"))
    if dist.get_rank() == 0:
        print(json.dumps(results))
    return 0
