"""``cropi score CONFIG``: projected POPI gradients of stored trajectories at a checkpoint.

    cropi score CONFIG [--sets pool,val] [--checkpoint DIR] [--tag NAME]
    torchrun --nproc-per-node 4 -m megatron_cropi.cli score CONFIG        # any TP/PP/DP layout

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

__all__ = ["cmd_score", "score_sets"]


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
    if cfg.rollout.checkpoint:
        return cfg.rollout.checkpoint, None
    warm = Path(cfg.run.output_dir) / "warmup" / "hf"
    return (str(warm), None) if (warm / "config.json").exists() else (None, None)


def score_sets(cfg, sets: list[str], *, checkpoint: str | None = None, tag: str | None = None,
               fault=None) -> dict:
    """Score every named set; return ``{set: ScoreStats as dict}`` (identical on every rank)."""
    import torch.distributed as dist

    from megatron_cropi.checkpoint.dist_ckpt import load_checkpoint, read_checkpoint_meta
    from megatron_cropi.curriculum.runtime import build_policy_model, setup_run
    from megatron_cropi.influence.feature_store import FeatureHeader, FeatureStore, hash_strings
    from megatron_cropi.influence.scorer import param_set_hash, score_pool
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.rollout.store import TrajectoryStore

    groups, _, tokenizer = setup_run(cfg)
    hf_dir, ckpt = _policy_source(cfg, checkpoint)
    model = build_policy_model(cfg, groups, hf_dir=hf_dir)
    step = 0
    if ckpt:
        step = int(read_checkpoint_meta(ckpt)["step"])
        load_checkpoint(ckpt, model=model, groups=groups, restore_rng=False)
    projector = build_projector(cfg.projection)
    pset = param_set_hash(model, groups, cfg.scoring)
    out_root = Path(cfg.run.output_dir) / "features" / (tag or f"step{step}")
    results = {}
    for name in sets:
        store = TrajectoryStore.open(Path(cfg.run.output_dir) / "rollouts" / name)
        if not store.complete:
            raise RuntimeError(f"{store.path} is not complete; finish it with `cropi rollout` first")
        rollouts = list(store.iter_groups())
        sp = store.header.sampling_params
        header = FeatureHeader(num_rows=len(rollouts), k=projector.k, seed=cfg.projection.seed,
                               projector=json.dumps(projector.describe(), sort_keys=True, default=str),
                               param_set_hash=pset, checkpoint_step=step,
                               prompt_id_hash=hash_strings(g.prompt_id for g in rollouts),
                               dtype=cfg.scoring.feature_dtype)
        fs = FeatureStore.open(out_root / name, header) if dist.get_rank() == 0 else None
        temperature = sp.temperature if sp.logprobs == "sampling" and sp.temperature > 0 else 1.0
        stats = score_pool(rollouts, fs, model=model, groups=groups, projector=projector, cfg=cfg.scoring,
                           temperature=temperature, responses_per_prompt=sp.n,
                           pad_id=int(getattr(tokenizer, "pad_token_id", 0) or 0), progress=cfg.rollout.progress,
                           on_chunk=fault)
        results[name] = {**dataclasses.asdict(stats), "features": str(out_root / name),
                         "seconds_per_prompt": stats.seconds_per_prompt}
    return results


def cmd_score(args) -> int:
    from megatron_cropi.config.schema import load_run_config
    from megatron_cropi.curriculum.controller import fault_point

    cfg = load_run_config(args.config)
    root = Path(cfg.run.output_dir) / "rollouts"
    if args.sets:
        sets = [s for s in args.sets.split(",") if s]
    else:  # every store of a prompt set that is scored: the pool and the target sets
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
        sets = [s for s in present if s in ("pool", "val") or s.startswith("target-")]
    if not sets:
        raise FileNotFoundError(f"no trajectory store under {root}; run `cropi rollout {args.config}` first")
    results = score_sets(cfg, sets, checkpoint=args.checkpoint, tag=args.tag,
                         fault=lambda: fault_point("score:chunk"))
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(json.dumps(results))
    return 0
