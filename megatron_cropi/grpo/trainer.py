"""The GRPO trainer: rollouts → rewards → group advantages → Megatron update → weight sync.

    trainer = GrpoTrainer(cfg.grpo, cfg.model, groups, model=model, engine=sampler, rewarder=rewarder,
                          sampling=sampling, prompts=pool, metrics=MetricsLogger(...), seed=cfg.run.seed)
    for _ in range(T):
        metrics = trainer.step()            # or trainer.step(prompts) with an explicit global batch
    trainer.set_prompts(subset)            # next CROPI stage: new prompts, same optimizer state
    trainer.save(); trainer.load(path)      # or load(path, load_optimizer=False); load_hf(hf_dir)

One :meth:`GrpoTrainer.step`:

1. the step's global prompt batch (``prompts_per_step`` from the :class:`~megatron_cropi.grpo.data.PromptStream`,
   or given); DP rank ``r`` takes the ``r``-th contiguous slice;
2. on-policy rollouts with the step's sampling seed ``hash(seed, step)`` (samples are functions of
   ``(seed, prompt id, sample index)``, so a resumed run samples what an uninterrupted one would);
3. rewards on the replica's lead rank, shared with its TP/PP ranks (:mod:`.rollouts`);
   with ``grpo.dynamic_sampling.enabled``, groups whose rewards are all equal are dropped and the batch
   is refilled from the stream, round after round (:mod:`.dynamic_sampling`);
4. the policy update (:class:`~megatron_cropi.grpo.update.PolicyLearner`); a batch in which every group
   has equal rewards is skipped (no optimizer step), counted in ``skipped_steps`` and logged; an update
   whose gradient has a NaN/inf is skipped too, counted in ``nonfinite_updates`` and logged (warning);
5. weight sync to the engine (:mod:`.weight_sync`), only when an optimizer step was taken: after a
   skipped step the engine keeps the previous (finite) weights;
6. metrics (identical on every rank; written by the metrics rank) and a checkpoint every
   ``checkpoint.save_interval`` steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_cropi.grpo.config import GrpoConfig
from megatron_cropi.grpo.data import PromptStream
from megatron_cropi.grpo.dynamic_sampling import DynamicBatch, collect_dynamic_batch
from megatron_cropi.grpo.optimizer import build_optimizer, wrap_ddp
from megatron_cropi.grpo.reference import ReferencePolicy
from megatron_cropi.grpo.rollouts import Rewarder, RolloutCollector
from megatron_cropi.grpo.update import PolicyLearner
from megatron_cropi.grpo.weight_sync import WeightSync, weight_sync_for
from megatron_cropi.metrics import MetricsLogger
from megatron_cropi.model.config import ModelConfig
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.records import PromptRecord, RolloutGroup, SamplingParams

__all__ = ["GrpoTrainer", "step_seed"]

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of training step ``step`` (31 bits of a hash of both)."""
    return int.from_bytes(hashlib.blake2b(f"grpo:{seed}:{step}".encode(), digest_size=4).digest(), "little") >> 1


class GrpoTrainer:
    """GRPO on a Megatron-Core policy (see the module docstring).

    Args:
        cfg: the GRPO configuration.
        model_cfg: the policy's model configuration (reference model, HF export).
        groups: this rank's process groups.
        model: this rank's ``GPTModel`` stage (not yet wrapped; the native sampler may hold it).
        engine: the rollout engine (None on ranks without one, for non-collective engines).
        rewarder: scores responses (:mod:`megatron_cropi.grpo.rollouts`).
        sampling: rollout sampling parameters (``n`` = K; the seed is the base of each step's seed).
        prompts: the prompt set :meth:`step` draws batches from (optional when batches are given).
        metrics: a :class:`~megatron_cropi.metrics.MetricsLogger` (optional).
        weight_sync: default :func:`~megatron_cropi.grpo.weight_sync.weight_sync_for` the engine.
        seed: data-order seed.
        total_steps: steps the LR schedule spans (default ``cfg.steps``).
        checkpoint_dir: root of :meth:`save` (default ``cfg.checkpoint.dir`` or ``./checkpoints``).
        pad_id: padding token id.
    """

    def __init__(self, cfg: GrpoConfig, model_cfg: ModelConfig, groups: ParallelGroups, *, model, engine,
                 rewarder: Rewarder, sampling: SamplingParams, prompts: Sequence[PromptRecord] | None = None,
                 metrics: MetricsLogger | None = None, weight_sync: WeightSync | None = None, seed: int = 0,
                 total_steps: int | None = None, checkpoint_dir: str | Path | None = None, pad_id: int = 0):
        vp = model_cfg.virtual_pipeline_size
        if vp is not None or isinstance(model, (list, tuple)):
            # the step wraps one module in DDP, builds one optimizer over it and runs one schedule chunk
            raise ValueError(f"model.transformer.virtual_pipeline_model_parallel_size={vp}: GRPO training under the "
                             "interleaved (virtual pipeline) schedule is not supported (the trainer runs one model "
                             "chunk per pipeline stage); use plain 1F1B pipeline parallelism")
        if cfg.prompts_per_step % groups.dp_size:
            raise ValueError(f"grpo.prompts_per_step={cfg.prompts_per_step} must be divisible by the data-parallel "
                             f"size {groups.dp_size}")
        if sampling.top_p != 1.0:
            raise ValueError(f"GRPO needs rollout top_p = 1 (got {sampling.top_p}): the trainer's log-probs are of "
                             "the tempered full distribution")
        if sampling.logprobs == "raw" and sampling.temperature != 1.0 and cfg.old_logprobs == "behaviour":
            raise ValueError("rollout.logprobs is 'raw' with temperature != 1: the sampler's log-probs are not of the "
                             "sampled distribution; use logprobs: sampling or grpo.old_logprobs: recompute")
        if sampling.logprobs == "raw" and sampling.temperature != 1.0 and cfg.loss.tis_imp_ratio_cap is not None:
            raise ValueError(f"grpo.loss.tis_imp_ratio_cap={cfg.loss.tis_imp_ratio_cap} with rollout.logprobs 'raw' "
                             f"and temperature {sampling.temperature}: the engine's log-probs are not of the sampled "
                             "distribution, so the importance weights would be wrong; use rollout.logprobs: sampling")
        self.cfg, self.model_cfg, self.groups = cfg, model_cfg, groups
        self.sampling, self.seed = sampling, int(seed)
        self.metrics = metrics or MetricsLogger("", enabled=False)
        self.model = model
        self.ddp = wrap_ddp(model, groups, cfg.optim)
        steps = total_steps if total_steps is not None else cfg.steps
        self.optimizer, self.scheduler = build_optimizer(self.ddp, groups, cfg.optim,
                                                         total_steps=max(1, steps * cfg.updates_per_step))
        self.reference = ReferencePolicy(model_cfg, groups, model) if cfg.loss.kl_coef > 0 else None
        self.learner = PolicyLearner(self.ddp, self.optimizer, self.scheduler, groups, cfg,
                                     reference=self.reference, pad_id=pad_id)
        self.collector = RolloutCollector(engine, rewarder, groups)
        self.weight_sync = weight_sync or weight_sync_for(engine, groups, model_cfg=model_cfg)
        self.stream = PromptStream(prompts, seed=self.seed) if prompts else None
        self.checkpoint_dir = Path(checkpoint_dir or cfg.checkpoint.dir or "checkpoints")
        self.step_count = 0
        self.skipped_steps = 0
        self.nonfinite_updates = 0  # optimizer steps skipped for a NaN/inf gradient (fp16 overflows too)
        self.last_dynamic_batch: DynamicBatch | None = None  # the latest dynamic-sampling step's batch

    # -- data ------------------------------------------------------------------------------------
    def set_prompts(self, prompts: Sequence[PromptRecord]) -> None:
        """Train on a new prompt set from now on (a CROPI stage's subset); optimizer state is kept."""
        if self.stream is None:
            self.stream = PromptStream(prompts, seed=self.seed)
        else:
            self.stream.set_prompts(prompts)

    def _local_slice(self, batch: Sequence) -> tuple[list, list[int]]:
        g = self.groups
        if len(batch) % g.dp_size:
            raise ValueError(f"a step's batch of {len(batch)} prompts is not divisible by the data-parallel size {g.dp_size}")
        per = len(batch) // g.dp_size
        start = g.dp_rank * per
        return list(batch[start:start + per]), list(range(start, start + per))

    # -- one step --------------------------------------------------------------------------------
    def step(self, prompts: Sequence[PromptRecord] | None = None) -> dict:
        """One GRPO step on ``prompts`` (the global batch; default: the next batch of the prompt set)."""
        if prompts is None:
            if self.stream is None:
                raise ValueError("GrpoTrainer.step() without prompts needs a prompt set (prompts= or set_prompts)")
            prompts = self.stream.next_batch(self.cfg.prompts_per_step)
        sampling = dataclasses.replace(self.sampling, seed=step_seed(self.sampling.seed, self.step_count))
        if self.cfg.dynamic_sampling.enabled:
            return self._dynamic_step(prompts, sampling)
        local, positions = self._local_slice(prompts)
        t0 = time.perf_counter()
        rollouts = self.collector.collect(local, sampling, policy_version=self.step_count)
        rollout_s = time.perf_counter() - t0
        return self.train_on_rollouts(rollouts, positions, rollout_seconds=rollout_s)

    def _dynamic_step(self, prompts: Sequence[PromptRecord], sampling: SamplingParams) -> dict:
        """A step with dynamic sampling: ``prompts`` is round 0; extra rounds come from the prompt stream."""
        batch = collect_dynamic_batch(
            self.collector, self.groups, prompts, draw=self.stream.next_batch if self.stream is not None else None,
            max_extra_rounds=self.cfg.dynamic_sampling.max_extra_rounds, sampling=sampling,
            policy_version=self.step_count)
        self.last_dynamic_batch = batch
        return self.train_on_rollouts(batch.groups, batch.positions, rollout_seconds=batch.rollout_seconds,
                                      sampled=batch.sampled, extra_metrics=batch.metrics())

    def train_on_rollouts(self, rollouts: Sequence[RolloutGroup], positions: Sequence[int], *,
                          rollout_seconds: float = 0.0, sampled: Sequence[RolloutGroup] | None = None,
                          extra_metrics: dict | None = None) -> dict:
        """Steps 3-6 on given, already scored rollout groups of this DP rank (tests use fixed ones).

        ``sampled``: the groups the step's reward statistics are of (default ``rollouts``; dynamic
        sampling passes every group it rolled out); ``extra_metrics`` are logged with the step's.
        """
        g = self.groups
        reward_stats = self._reward_stats(rollouts if sampled is None else sampled)
        t0 = time.perf_counter()
        out = self.learner.update(rollouts, positions, temperature=self.sampling.temperature)
        train_s = time.perf_counter() - t0
        sync_s = self.weight_sync.push(self.ddp, g) if out.get("updates", 0) > 0 else 0.0
        self.step_count += 1
        self.skipped_steps += int(out["skipped"])
        self.nonfinite_updates += int(out.get("nonfinite_updates", 0))
        if out.get("nonfinite_updates", 0) and g.rank == 0:
            log.warning("step %d: non-finite gradient in %d of %d updates, skipped (%d so far); the engine keeps "
                        "the previous weights%s", self.step_count, out["nonfinite_updates"],
                        out["nonfinite_updates"] + out["updates"], self.nonfinite_updates,
                        f" (fp16 loss scale now {out['loss_scale']:g})" if "loss_scale" in out else "")
        out.update(reward_stats)
        out.update(extra_metrics or {})
        out.update(rollout_seconds=rollout_seconds, train_seconds=train_s, weight_sync_seconds=sync_s,
                   tokens_per_s=out.get("response_tokens", 0.0) / max(train_s, 1e-9),
                   rollout_tokens_per_s=reward_stats["generated_tokens"] / rollout_seconds if rollout_seconds else 0.0,
                   skipped_total=float(self.skipped_steps), nonfinite_total=float(self.nonfinite_updates),
                   step=float(self.step_count))
        if self.step_count % self.cfg.log_interval == 0 or out["skipped"] or out.get("nonfinite_updates", 0):
            self.metrics.log(self.step_count, out, prefix="train")
        interval = self.cfg.checkpoint.save_interval
        if interval and self.step_count % interval == 0:
            self.save()
        return out

    def _reward_stats(self, rollouts: Sequence[RolloutGroup]) -> dict:
        rewards = [float(r) for grp in rollouts for r in grp.rewards]
        tokens = [len(r.token_ids) for grp in rollouts for r in grp.responses]
        v = torch.tensor([sum(rewards), len(rewards), sum(r > 0.5 for r in rewards), sum(tokens),
                          sum(grp.zero_variance for grp in rollouts), len(rollouts)], dtype=torch.float64,
                         device=self.groups.device)
        if self.groups.dp_size > 1:
            dist.all_reduce(v, group=self.groups.dp)
        s, n, passed, toks, zero, groups = v.tolist()
        return {"reward": s / max(n, 1), "pass_rate": passed / max(n, 1), "response_length": toks / max(n, 1),
                "generated_tokens": toks, "zero_variance_fraction": zero / max(groups, 1)}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, prompts: Sequence[PromptRecord], *, samples: int = 4, seed: int = 0) -> dict:
        """Sampled pass rate (mean reward of ``samples`` responses at the rollout temperature) on ``prompts``.

        Prompts are split over DP ranks (the last rank may get fewer); no training happens.
        """
        g = self.groups
        per = -(-len(prompts) // g.dp_size)
        local = list(prompts[g.dp_rank * per:(g.dp_rank + 1) * per])
        sampling = dataclasses.replace(self.sampling, n=samples, seed=step_seed(seed, -1))
        groups = self.collector.collect(local, sampling, policy_version=self.step_count)
        stats = self._reward_stats(groups)
        return {"reward": stats["reward"], "pass_rate": stats["pass_rate"], "response_length": stats["response_length"]}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable trainer state: step, skipped steps, data position."""
        return {"step": self.step_count, "skipped_steps": self.skipped_steps, "nonfinite_updates": self.nonfinite_updates,
                "data": self.stream.state_dict() if self.stream is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_updates = int(state.get("nonfinite_updates", 0))
        if state.get("data") is not None and self.stream is not None:
            self.stream.load_state_dict(state["data"])

    def save(self, root: str | Path | None = None) -> Path:
        """Checkpoint model, optimizer, scheduler, reference, RNG and :meth:`state_dict` (every rank calls)."""
        from megatron_cropi.checkpoint.dist_ckpt import save_checkpoint

        return save_checkpoint(root or self.checkpoint_dir, self.step_count, model=self.ddp, groups=self.groups,
                               optimizer=self.optimizer, scheduler=self.scheduler, reference=self._reference_model,
                               state=self.state_dict(), keep_last=self.cfg.checkpoint.keep_last)

    def save_unless_current(self) -> Path:
        """The newest checkpoint in ``checkpoint_dir`` when it is of the current step, else a new one."""
        from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint, read_checkpoint_meta

        from megatron_cropi.utils.rank_zero import share_from_rank0

        # rank 0 decides for all: save() is a collective, and ranks must not disagree on the directory
        last = share_from_rank0(latest_checkpoint(self.checkpoint_dir) if self.groups.rank == 0 else None)
        if last is not None and int(read_checkpoint_meta(last)["step"]) == self.step_count:
            return last
        return self.save()

    def load(self, path: str | Path, *, load_optimizer: bool | None = None) -> dict:
        """Restore a checkpoint (any TP/PP/DP layout of the same model), then push the weights to the engine.

        Without the optimizer state (``load_optimizer`` False) the optimizer keeps its moments but its
        fp32 main weights are reloaded from the loaded model, so the next step starts from the loaded
        weights (:func:`~megatron_cropi.checkpoint.dist_ckpt.load_checkpoint`, ``weights_only``).
        """
        from megatron_cropi.checkpoint.dist_ckpt import load_checkpoint

        with_opt = self.cfg.checkpoint.load_optimizer if load_optimizer is None else load_optimizer
        meta = load_checkpoint(path, model=self.ddp, groups=self.groups, optimizer=self.optimizer,
                               scheduler=self.scheduler if with_opt else None, reference=self._reference_model,
                               weights_only=not with_opt)
        self.load_state_dict(meta["state"])
        self.weight_sync.push(self.ddp, self.groups)
        return meta

    def load_hf(self, hf_dir: str | Path) -> int:
        """Replace the policy's weights by an HF checkpoint's (the optimizer's main weights follow), push
        them to the engine; returns how many parameters were set. Every rank calls it."""
        from megatron_cropi.checkpoint import load_hf_into_model
        from megatron_cropi.checkpoint.dist_ckpt import reload_main_params

        count = load_hf_into_model(self.model, self.groups, hf_dir)
        reload_main_params(self.optimizer)  # else the first step writes the old fp32 main weights back
        self.weight_sync.push(self.ddp, self.groups)
        return count

    @property
    def _reference_model(self):
        return self.reference.model if self.reference is not None else None

    def reset_reference(self) -> None:
        """Make the current policy the KL reference (no-op without a reference model)."""
        if self.reference is not None:
            self.reference.reset_from(self.model)

    def close(self) -> None:
        self.metrics.close()

    @staticmethod
    def mean_metric(history: Sequence[dict], key: str) -> float:
        """Mean of ``key`` over metric dicts (helper for tests and reports)."""
        vals = [h[key] for h in history if key in h and np.isfinite(h[key])]
        return float(np.mean(vals)) if vals else float("nan")
