"""Wiring: from a :class:`~megatron_cropi.run_config.RunConfig` to the live objects of a run.

The commands (``cropi run``, ``train``, ``score``, ``rollout``) build their live objects here: the
process groups and threads (:func:`setup_run`), the prompt sets (:func:`load_prompt_sets`),
the weights to start from (:func:`initial_weights`), the policy model (:func:`build_policy_model`; the
scoring commands' :func:`build_scoring_model` also runs the interleaved schedule's chunks),
the rollout engine (:func:`build_engine`) and the policy's identity in store headers
(:func:`policy_identity`).

:class:`PolicyRuntime` holds this rank's process groups, the tokenizer, the policy model inside its
:class:`~megatron_cropi.grpo.trainer.GrpoTrainer` (DDP, optimizer carried across stages), the rollout
engine that samples from it (the native sampler shares its weights; vLLM gets them pushed after each
update) and the reward function. The stage controller only calls into it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_cropi.layout import RunLayout
from megatron_cropi.parallel import ParallelGroups, build_parallel_groups, init_distributed
from megatron_cropi.records import PromptRecord



class RunInputError(ValueError):
    """The run's inputs cannot make a run (an empty pool, no target set, a tokenizer that does not fit)."""


__all__ = ["RunInputError", "PromptSets", "PolicyRuntime", "load_prompt_sets", "configure_threads", "setup_run",
           "build_policy_model", "build_scoring_model", "build_engine", "initial_weights", "pad_id_of", "policy_identity", "checkpoint_identity"]

log = logging.getLogger(__name__)


def configure_threads(num_threads: int) -> int:
    """torch threads for this process: the configured number, or cores ÷ local processes."""
    import os

    if num_threads <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        num_threads = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(num_threads)
    return num_threads


@dataclass
class PromptSets:
    """The run's prompts: the pool, one or more target sets, the test set and the check set."""

    pool: list[PromptRecord]
    targets: dict[str, list[PromptRecord]]
    test: list[PromptRecord]
    check: list[PromptRecord]
    summaries: dict

    @property
    def target_family(self) -> str:
        return sorted(self.targets)[0]


def load_prompt_sets(cfg) -> tuple[PromptSets, object]:
    """Load every split of ``cfg.data`` (and the tokenizer). Target sets are the val split, one per
    source (the synthetic suite has one: its target family).

    Raises:
        ValueError: an empty pool or no target prompt.
    """
    from megatron_cropi.data.prompts import build_tokenizer, load_prompt_set

    tok = build_tokenizer(cfg.data)
    sets = {s: load_prompt_set(cfg.data, s, tokenizer=tok) for s in ("pool", "val", "test", "check")}
    if not sets["pool"].records:
        raise RunInputError("the pool is empty: data.pool (or data.synthetic.per_family) gives no prompt")
    targets: dict[str, list[PromptRecord]] = {}
    for rec in sets["val"].records:
        targets.setdefault(rec.source or "val", []).append(rec)
    if not targets:
        raise RunInputError("no target set: data.val (or data.synthetic.val_size) gives no prompt; CROPI scores "
                         "the pool against the gradient of a target set")
    return PromptSets(pool=sets["pool"].records, targets=targets, test=sets["test"].records,
                      check=sets["check"].records, summaries={s: v.summary() for s, v in sets.items()}), tok


def setup_run(cfg) -> tuple[ParallelGroups, PromptSets, object]:
    """Initialise torch.distributed (a lone process needs no torchrun), threads, groups; load the data."""
    init_distributed(allow_single=True)
    configure_threads(cfg.run.num_threads)
    groups = build_parallel_groups(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                                   seed=cfg.run.seed)
    prompts, tokenizer = load_prompt_sets(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise RunInputError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {cfg.model.vocab_size}")
    return groups, prompts, tokenizer


def pad_id_of(tokenizer) -> int:
    """The id sequences are padded with (0 when the tokenizer has none)."""
    return int(getattr(tokenizer, "pad_token_id", 0) or 0)


def initial_weights(cfg, layout: RunLayout) -> str | None:
    """The HF directory every command starts the policy from: ``rollout.checkpoint`` if set, else the
    warm-up's export (``warmup/hf``) when it exists, else None (a seeded random initialisation).

    ``cropi run`` and ``cropi train`` make the warm-up first when it is enabled and missing; this rule
    only says which weights count once it is there.
    """
    if cfg.rollout.checkpoint:
        return cfg.rollout.checkpoint
    return str(layout.warmup_hf) if (layout.warmup_hf / "config.json").is_file() else None


def checkpoint_identity(path: str | Path) -> str:
    """``hf:<dir name>:<blake2b of config.json and every *.safetensors file>``: differs when any weight does."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=12)
    for f in sorted([path / "config.json"] + list(path.glob("*.safetensors"))):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return f"hf:{path.name}:{h.hexdigest()}"


def policy_identity(cfg, hf_dir: str | Path | None) -> str:
    """The policy a trajectory store was sampled from: its checkpoint's identity, or the random init's."""
    if hf_dir:
        return checkpoint_identity(hf_dir)
    digest = hashlib.blake2b(json.dumps(cfg.model.transformer, sort_keys=True, default=str).encode(),
                             digest_size=8).hexdigest()
    return f"random-init:seed={cfg.run.seed}:{cfg.model.preset}:{digest}"


def build_engine(cfg, groups: ParallelGroups | None, tokenizer, *, model=None, hf_dir: str | Path | None = None,
                 isolate: bool = False):
    """The rollout engine ``rollout.engine`` names.

    ``native``: a :class:`~megatron_cropi.rollout.native_sampler.NativeSampler` on ``model`` (the
    policy's own weights, shared). ``vllm`` on ``hf_dir`` (weights are pushed to it after updates):

    * a world of several ranks: a :class:`~megatron_cropi.rollout.colocated.ColocatedVLLMEngine` on
      **every** rank (vLLM's external launcher; ``rollout.vllm.tensor_parallel_size`` ranks per engine,
      which must divide the world; every rank builds its shard together, a collective);
    * one process, or ``isolate`` (``cropi rollout``, where no weights are pushed: vLLM in a child
      process): a :class:`~megatron_cropi.rollout.vllm_engine.VLLMEngine` with its own parallelism.

    Raises:
        ValueError: ``rollout.vllm.tensor_parallel_size`` does not divide the world (named).
    """
    rc = cfg.rollout
    eos = [tokenizer.eos_token_id]
    if rc.engine == "native":
        from megatron_cropi.rollout.native_sampler import NativeSampler

        return NativeSampler(model, groups, stop_token_ids=eos, max_batch_sequences=rc.max_batch_sequences,
                             kv_cache=rc.native.kv_cache)
    v = rc.vllm
    kwargs = dict(logprobs=rc.logprobs, stop_token_ids=eos, dtype=v.dtype, max_model_len=v.max_model_len or None,
                  gpu_memory_utilization=v.gpu_memory_utilization, enforce_eager=v.enforce_eager,
                  enable_prefix_caching=v.enable_prefix_caching, seed=cfg.run.seed,
                  tokenizer_dir=rc.tokenizer_dir or None)
    model_dir = str(hf_dir or rc.checkpoint)
    if groups is not None and groups.world_size > 1 and not isolate:
        from megatron_cropi.rollout.colocated import ColocatedVLLMEngine

        engine = ColocatedVLLMEngine(groups, model_dir, engine_tp=v.tensor_parallel_size, sleep_mode=v.sleep_mode,
                                     **kwargs)
        log.info("colocated vLLM engine: %r", engine.layout)
        return engine
    from megatron_cropi.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, tensor_parallel_size=v.tensor_parallel_size, isolate=isolate, **kwargs)


def build_policy_model(cfg, groups: ParallelGroups, *, hf_dir: str | Path | None = None):
    """This rank's policy stage: weights from an HF directory, else drawn from ``(run.seed, name)``."""
    from megatron_cropi.model.params import init_params_by_global_name
    from megatron_cropi.model.provider import build_gpt_model

    model = build_gpt_model(cfg.model, groups)
    if hf_dir:
        from megatron_cropi.checkpoint import load_hf_into_model

        load_hf_into_model(model, groups, hf_dir)
    else:
        init_params_by_global_name(model, groups, seed=cfg.run.seed,
                                   std=cfg.model.transformer.get("init_method_std", 0.02))
    return model


def build_scoring_model(cfg, groups: ParallelGroups, *, hf_dir: str | Path | None = None):
    """The policy as ``cropi score``/``cropi select`` run it: under the interleaved schedule
    (``model.transformer.virtual_pipeline_model_parallel_size = V``) this rank's list of V chunks
    (:func:`~megatron_cropi.model.provider.build_model_chunks`, each holding its own global layers),
    weights from an HF directory or drawn from ``(run.seed, global name)`` as the one-module stage's are;
    else :func:`build_policy_model`'s one stage. Both load a distributed checkpoint
    (:func:`~megatron_cropi.checkpoint.dist_ckpt.load_checkpoint`) and score (``PolicyScorer``)."""
    if cfg.model.virtual_pipeline_size is None:
        return build_policy_model(cfg, groups, hf_dir=hf_dir)
    from megatron_cropi.model.params import init_params_by_global_name
    from megatron_cropi.model.provider import build_model_chunks

    chunks = build_model_chunks(cfg.model, groups)
    if hf_dir:
        from megatron_cropi.checkpoint import load_hf_into_model

        load_hf_into_model(chunks, groups, hf_dir)
    else:
        for chunk in chunks:
            init_params_by_global_name(chunk, groups, seed=cfg.run.seed,
                                       std=cfg.model.transformer.get("init_method_std", 0.02))
    return chunks


class PolicyRuntime:
    """This rank's policy, engine, rewarder and trainer for a run (see the module docstring).

    Args:
        cfg: the run configuration.
        groups, tokenizer: from :func:`setup_run`.
        hf_dir: initial weights (:func:`initial_weights`); None: seeded random init.
        total_steps: GRPO steps the LR schedule spans.
        metrics: a :class:`~megatron_cropi.metrics.MetricsLogger`.
        checkpoint_dir: where GRPO checkpoints go (default: the run's ``checkpoints/``).
    """

    def __init__(self, cfg, groups: ParallelGroups, tokenizer, *, hf_dir=None, total_steps: int, metrics=None,
                 checkpoint_dir: str | Path | None = None):
        from megatron_cropi.grpo.rollouts import make_rewarder
        from megatron_cropi.grpo.trainer import GrpoTrainer
        from megatron_cropi.rewards.base import RewardFunction
        from megatron_cropi.rewards.config import reward_config_for

        self.cfg, self.groups, self.tokenizer = cfg, groups, tokenizer
        self.hf_dir = str(hf_dir) if hf_dir else ""
        self.model = build_policy_model(cfg, groups, hf_dir=hf_dir)
        self.engine = build_engine(cfg, groups, tokenizer, model=self.model, hf_dir=self.hf_dir)
        self.reward_fn = RewardFunction(reward_config_for(cfg.rollout.reward, cfg.data.kind))
        self.rewarder = make_rewarder(self.reward_fn, tokenizer)
        self.sampling = cfg.rollout.sampling_params(cfg.run.seed)
        self.trainer = GrpoTrainer(cfg.grpo, cfg.model, groups, model=self.model, engine=self.engine,
                                   rewarder=self.rewarder, sampling=self.sampling, metrics=metrics,
                                   seed=cfg.run.seed, total_steps=max(1, total_steps),
                                   checkpoint_dir=checkpoint_dir or RunLayout(cfg.run.output_dir).checkpoints,
                                   pad_id=self.pad_id)

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    def close(self) -> None:
        self.reward_fn.close()
        if hasattr(self.engine, "close"):
            self.engine.close()
        self.trainer.close()
