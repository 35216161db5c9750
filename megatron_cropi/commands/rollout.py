"""``cropi rollout CONFIG``: roll a prompt set out into a trajectory store, resuming a partial one.

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
from pathlib import Path

from megatron_cropi.data.loaders import DataError
from megatron_cropi.data.prompt_ids import pool_hash
from megatron_cropi.data.prompts import build_tokenizer, load_prompt_set
from megatron_cropi.layout import RunLayout
from megatron_cropi.rewards.base import RewardFunction
from megatron_cropi.rewards.config import reward_config_for
from megatron_cropi.rollout.runner import RolloutSummary, rollout_prompts
from megatron_cropi.rollout.store import StoreError, StoreHeader, TrajectoryStore
from megatron_cropi.commands.config_args import load_config
from megatron_cropi.utils.rank_zero import on_rank0
from megatron_cropi.wiring import build_engine, build_policy_model, policy_identity

__all__ = ["cmd_rollout", "run_rollout"]

log = logging.getLogger(__name__)


def run_rollout(cfg, *, split: str | None = None, store_dir: str | None = None, limit: int = 0,
                repair: bool = False) -> RolloutSummary:
    """Roll the configured prompt set out into the trajectory store, resuming.

    Args:
        cfg: the :class:`~megatron_cropi.run_config.RunConfig`.
        split: prompt set (default ``rollout.split``).
        store_dir: store directory (default ``rollout.store_dir`` or ``{output_dir}/rollouts/{split}``).
        limit: roll out only the first ``limit`` prompts of the set (0: all); part of the store's identity.
        repair: drop corrupt store parts and roll their prompts out again.
    """
    rc = cfg.rollout
    split = split or rc.split
    groups = model = None
    if rc.engine == "native":
        from megatron_cropi.parallel import build_parallel_groups, init_distributed

        init_distributed(allow_single=True)
        groups = build_parallel_groups(cfg.parallel.tensor_model_parallel_size,
                                       cfg.parallel.pipeline_model_parallel_size, seed=cfg.run.seed)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("run `cropi rollout` with engine: vllm as one process (no torchrun); vLLM parallelises "
                           "itself through rollout.vllm.tensor_parallel_size")
    tokenizer = build_tokenizer(cfg.data)
    if rc.engine == "native" and tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer ({tokenizer.identity}) has {tokenizer.vocab_size} ids but model.vocab_size is "
                         f"{cfg.model.vocab_size}")
    prompt_set = load_prompt_set(cfg.data, split, tokenizer=tokenizer)
    prompts = prompt_set.records[:limit] if limit else prompt_set.records
    if not prompts:
        raise ValueError(f"data split {split!r} has no prompts")
    sampling = rc.sampling_params(cfg.run.seed)
    if rc.engine == "native":
        if not rc.checkpoint:
            log.warning("rollout.checkpoint is empty: sampling from a randomly initialised model (smoke tests only)")
        model = build_policy_model(cfg, groups, hf_dir=rc.checkpoint or None)
    engine = build_engine(cfg, groups, tokenizer, model=model, hf_dir=rc.checkpoint, isolate=rc.vllm.isolate)
    writer = groups is None or groups.rank == 0
    store = reward_fn = None
    path = Path(store_dir or rc.store_dir or RunLayout(cfg.run.output_dir).rollouts(split))
    try:
        opened: list = []  # store and verifier stay on rank 0; every rank learns if opening failed

        def open_store():
            header = StoreHeader.build(sampling, tokenizer=tokenizer.identity, model=policy_identity(cfg, rc.checkpoint),
                                       policy_version=rc.policy_version, num_prompts=len(prompts), engine=rc.engine,
                                       pool_hash=pool_hash(p.prompt_id for p in prompts),
                                       extra={"split": split, "data": prompt_set.summary()})
            opened.append(TrajectoryStore.open_for_append(path, header, repair=repair))
            opened.append(RewardFunction(reward_config_for(rc.reward, cfg.data.kind)))

        on_rank0(open_store)
        if writer:
            store, reward_fn = opened
        summary = rollout_prompts(prompts, engine, sampling, store=store, reward_fn=reward_fn, tokenizer=tokenizer,
                                  batch_prompts=rc.batch_prompts, policy_version=rc.policy_version, groups=groups,
                                  progress=rc.progress, desc=f"rollout {split}")
    finally:
        if reward_fn is not None:
            reward_fn.close()
        if hasattr(engine, "close"):
            engine.close()
    summary.split, summary.store = split, str(path)
    if writer and summary.responses >= 64 and summary.mean_reward == 0.0:
        log.warning("all %d rewards of this rollout are 0: if the policy is not untrained, check the verifier "
                    "(rollout.reward.verifier) and the reference answers", summary.responses)
    if reward_fn is not None and hasattr(reward_fn.verifier, "stats"):
        summary.extra["verifier"] = dataclasses.asdict(reward_fn.verifier.stats)
    summary.extra["data"] = prompt_set.summary()
    return summary


def cmd_rollout(args) -> int:
    """The ``cropi rollout`` subcommand: prints the summary as JSON on rank 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args)
    try:
        summary = run_rollout(cfg, split=args.split, store_dir=args.store, limit=args.limit, repair=args.repair)
    except (DataError, StoreError, ValueError, FileNotFoundError) as err:
        print(f"cropi rollout: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dataclasses.asdict(summary), indent=2, default=str))
    return 0
