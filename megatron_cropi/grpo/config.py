"""GRPO configuration (``grpo:`` in the run config): loss, optimizer, checkpoints, step shape.

    grpo:
      steps: 300
      prompts_per_step: 32          # global batch of prompts (all data-parallel ranks together)
      micro_batch_prompts: 8        # prompts (× rollout.n sequences) per Megatron micro-batch
      old_logprobs: behaviour       # or recompute (vLLM); the engine/trainer gap is then logged
      drop_zero_variance_groups: true   # false: keep them in the token-mean as verl does
      loss: {clip_eps_low: 0.2, clip_eps_high: 0.28, kl_coef: 0.001, kl_type: low_var_kl,
             entropy_coef: 0.001, loss_agg: token-mean, tis_imp_ratio_cap: null}
      optim: {lr: 1.0e-6, clip_grad: 1.0, lr_warmup_steps: 0, lr_decay_style: constant}
      checkpoint: {save_interval: 50, keep_last: 2}
      dynamic_sampling: {enabled: false, max_extra_rounds: 4}   # DAPO's dynamic sampling

Defaults follow the paper's verl GRPO run (docs/design.md §4.5): lr 1e-6, one update
per step, KL ``low_var_kl`` 0.001, entropy bonus 0.001, clip ratio 0.2 (verl's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_cropi.config.loader import require

__all__ = ["GrpoLossConfig", "OptimConfig", "CheckpointConfig", "DynamicSamplingConfig", "GrpoConfig"]


@dataclass(frozen=True, kw_only=True)
class GrpoLossConfig:
    """The GRPO objective (:mod:`megatron_cropi.grpo.loss`)."""

    clip_eps_low: float = 0.2
    """Lower clip range: the ratio is clipped below at ``1 − clip_eps_low``."""
    clip_eps_high: float = 0.2
    """Upper clip range (clip-higher, DAPO: e.g. 0.28): the ratio is clipped above at ``1 + clip_eps_high``."""
    dual_clip_c: float | None = 3.0
    """Dual-clip bound for negative advantages (verl's ``clip_ratio_c``); null turns it off."""
    kl_coef: float = 0.001
    """Weight of the KL penalty to the frozen reference policy; 0 = no reference model is built."""
    kl_type: Literal["low_var_kl", "k1", "k2"] = "low_var_kl"
    """KL estimator per token: ``low_var_kl`` (k3, clamped to [-10, 10]), ``k1`` (log-ratio), ``k2``."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus (subtracted from the loss)."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """``token-mean``: mean over every response token of the step (all micro-batches, all DP ranks);
    ``seq-mean-token-mean``: mean over sequences of each sequence's token mean."""
    adv_eps: float = 1e-4
    """ε in the group-normalised advantage ``(r − mean) / (std + ε)`` (the same as POPI's)."""
    tis_imp_ratio_cap: float | None = None
    """Truncated importance sampling of the rollout engine/trainer mismatch (verl's ``tis_imp_ratio_cap``):
    each token's policy-gradient term is weighted by ``min(exp(log π_old − log μ), C)``, with ``log π_old``
    the trainer's recomputed old log-probs and ``log μ`` the engine's (e.g. vLLM in bf16), a constant
    (no gradient). Corrects the bias of training on samples of the engine's slightly different
    distribution; C (e.g. 2) bounds the variance. Null (default): off. Needs ``grpo.old_logprobs:
    recompute`` (otherwise both are the engine's numbers and every weight is 1)."""

    def __post_init__(self):
        require(0.0 <= self.clip_eps_low < 1.0, "clip_eps_low", self.clip_eps_low, "must be in [0, 1)")
        require(0.0 <= self.clip_eps_high <= 10.0, "clip_eps_high", self.clip_eps_high, "must be in [0, 10]")
        require(self.dual_clip_c is None or self.dual_clip_c > 1.0, "dual_clip_c", self.dual_clip_c,
                "must be > 1 or null")
        require(self.kl_coef >= 0.0, "kl_coef", self.kl_coef, "must be >= 0")
        require(self.entropy_coef >= 0.0, "entropy_coef", self.entropy_coef, "must be >= 0")
        require(self.adv_eps > 0.0, "adv_eps", self.adv_eps, "must be > 0")
        require(self.tis_imp_ratio_cap is None or self.tis_imp_ratio_cap > 0.0, "tis_imp_ratio_cap",
                self.tis_imp_ratio_cap, "must be > 0 or null")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """megatron-core optimizer (DDP + optional distributed optimizer), clipping and LR schedule."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """``adam`` (AdamW, decoupled weight decay) or ``sgd``."""
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    weight_decay: float = 0.01
    """Decoupled weight decay (verl's actor default)."""
    adam_beta1: float = 0.9
    """Adam β1."""
    adam_beta2: float = 0.999
    """Adam β2."""
    adam_eps: float = 1e-8
    """Adam ε."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (over all TP/PP/DP shards); 0 turns clipping off."""
    lr_warmup_steps: int = 0
    """Linear warm-up from ``lr_warmup_init`` to ``lr`` over this many optimizer steps."""
    lr_warmup_init: float = 0.0
    """Learning rate at step 0 of the warm-up."""
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = "constant"
    """megatron-core ``OptimizerParamScheduler`` decay style after warm-up."""
    lr_decay_steps: int = 0
    """Optimizer steps over which the LR decays to ``min_lr`` (0: the run's total optimizer steps)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over the data-parallel group (megatron-core ``DistributedOptimizer``)."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32 (bf16/fp16 models)."""
    initial_loss_scale: float = 65536.0
    """fp16 only (``model.params_dtype: float16``): first scale of megatron-core's dynamic loss scaler.
    The loss is multiplied by it before the backward and the gradients divided by it before the step;
    a step with an inf/NaN gradient is skipped and the scale lowered. (2^16, not Megatron's 2^32: a
    fresh run then does not start with ~16 skipped steps.)"""
    min_loss_scale: float = 1.0
    """fp16 only: the dynamic loss scale never goes below this."""
    loss_scale_window: int = 1000
    """fp16 only: the scale doubles after this many optimizer steps without an overflow."""
    hysteresis: int = 2
    """fp16 only: overflows tolerated before the scale is halved."""

    def __post_init__(self):
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        require(0 <= self.lr_warmup_init <= self.lr, "lr_warmup_init", self.lr_warmup_init, f"must be in [0, lr={self.lr}]")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "must be in [0, 1)")
        require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in [0, 1)")
        require(self.adam_eps > 0, "adam_eps", self.adam_eps, "must be > 0")
        require(self.clip_grad >= 0, "clip_grad", self.clip_grad, "must be >= 0 (0: off)")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, "must be >= 0")
        require(self.lr_decay_steps >= 0, "lr_decay_steps", self.lr_decay_steps, "must be >= 0")
        require(self.initial_loss_scale >= self.min_loss_scale > 0, "initial_loss_scale", self.initial_loss_scale,
                f"must be >= min_loss_scale={self.min_loss_scale} > 0")
        require(self.loss_scale_window >= 1, "loss_scale_window", self.loss_scale_window, "must be >= 1")
        require(self.hysteresis >= 1, "hysteresis", self.hysteresis, "must be >= 1")
        require(self.optimizer == "adam" or not self.use_distributed_optimizer, "use_distributed_optimizer",
                self.use_distributed_optimizer, f"must be false with optimizer {self.optimizer!r} (megatron-core's "
                "distributed optimizer shards Adam only)")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Distributed checkpoints (``megatron.core.dist_checkpointing``) of the GRPO run."""

    dir: str = ""
    """Checkpoint root (default ``{run.output_dir}/checkpoints``); one ``step_{N:08d}`` directory per save."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end of the run)."""
    keep_last: int = 2
    """Keep this many newest checkpoints (0: keep all)."""
    resume: bool = True
    """Resume from the newest complete checkpoint under ``dir`` when there is one."""
    load: str = ""
    """Start from this checkpoint directory instead (weights, optimizer and position)."""
    load_optimizer: bool = True
    """Load the optimizer state too (False: weights and position only, e.g. after changing the layout; the
    optimizer's fp32 main weights are then reloaded from the loaded weights, so the first step keeps them)."""

    def __post_init__(self):
        require(self.save_interval >= 0, "save_interval", self.save_interval, "must be >= 0")
        require(self.keep_last >= 0, "keep_last", self.keep_last, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class DynamicSamplingConfig:
    """Dynamic sampling (DAPO; GRESO): train every step on ``prompts_per_step`` groups *with* reward variance.

    A step rolls out ``prompts_per_step`` prompts from the prompt stream (round 0), drops the groups whose
    K rewards are all equal (zero advantage, no policy gradient), and while fewer than ``prompts_per_step``
    groups are kept draws another ``prompts_per_step`` prompts and rolls them out (an *extra round*), at
    most ``max_extra_rounds`` times. It trains on the first ``prompts_per_step`` kept groups in draw order
    (fewer when the cap is reached; the step is skipped when none is kept). The extra rounds' rollout time
    is part of the step's time, and the stream moves past every drawn prompt (kept or not).
    """

    enabled: bool = False
    """Refill the batch with fresh prompts until it has ``prompts_per_step`` groups with reward variance."""
    max_extra_rounds: int = 4
    """Rollout rounds a step may add after its first (each of ``prompts_per_step`` prompts)."""

    def __post_init__(self):
        require(0 <= self.max_extra_rounds <= 1000, "max_extra_rounds", self.max_extra_rounds,
                "must be between 0 and 1000")


@dataclass(frozen=True, kw_only=True)
class GrpoConfig:
    """Plain GRPO on a prompt set (the full-data baseline), and each CROPI stage's training."""

    steps: int = 100
    """Training steps (one rollout batch each)."""
    prompts_per_step: int = 128
    """Prompts per step over all data-parallel ranks; must divide by the DP size."""
    micro_batch_prompts: int = 8
    """Prompts per Megatron micro-batch (each with ``rollout.n`` sequences)."""
    updates_per_step: int = 1
    """Optimizer steps per rollout batch: the batch is split into this many mini-batches (PPO epochs of 1)."""
    old_logprobs: Literal["behaviour", "recompute"] = "behaviour"
    """Old-policy log-probs of the ratio: the sampler's (native sampler: equal to the training forward in
    fp32) or recomputed by a forward-only pass of the policy before the update (vLLM in bf16)."""
    logprob_chunk_tokens: int = 1024
    """Token positions per fp32 chunk of the log-prob and entropy (``model/logprobs.py``); 0 = the whole
    micro-batch at once (the same values, several times the logit memory)."""
    length_aware_microbatches: bool = False
    """Pack each mini-batch's groups by length: sorted by their longest prompt + response and each
    micro-batch padded only to its own longest (rounded up to ``length_multiple``), instead of every
    micro-batch to the step's longest sequence. The same loss and gradients (the token-mean is global;
    a group never straddles micro-batches), fewer padded positions. Pipeline parallelism exchanges one
    activation shape per schedule call, so with PP > 1 the step keeps one length."""
    length_multiple: int = 8
    """With ``length_aware_microbatches``: padded lengths are multiples of this."""
    drop_zero_variance_groups: bool = True
    """Zero-variance groups (all K rewards equal: advantage 0, no policy gradient). True (default): left
    out of the batch, so they are not in the token-mean's denominator and add no KL/entropy term, and a
    step whose groups all have equal rewards is skipped (no optimizer step). Why: the policy-gradient
    step size then does not shrink as more groups saturate (at pass rate 0 or 1 a kept group only
    dilutes the mean), and no compute goes to groups without signal; it is also what the scored
    POPI gradient does (§4.1 of docs/design.md: zero-variance prompts have g = 0 and are excluded).
    False: kept as verl does (the paper's pipeline): their tokens count in the token-mean, their KL and
    entropy terms apply, and every step takes an optimizer step."""
    split: Literal["pool", "val", "test", "check"] = "pool"
    """Prompt set ``cropi train`` trains on."""
    eval_split: Literal["", "pool", "val", "test", "check"] = "test"
    """Prompt set evaluated every ``eval_interval`` steps (sampled pass rate); empty: none."""
    eval_interval: int = 25
    """Evaluate every this many steps (0: never)."""
    eval_samples: int = 4
    """Samples per evaluation prompt (at the rollout temperature)."""
    eval_max_prompts: int = 300
    """Evaluate at most this many prompts of the eval split."""
    log_interval: int = 1
    """Write TensorBoard scalars every this many steps."""
    loss: GrpoLossConfig = field(default_factory=GrpoLossConfig)
    """The objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    """Drop zero-variance groups and refill the step's batch with fresh prompts (off by default)."""

    def __post_init__(self):
        require(self.steps >= 0, "steps", self.steps, "must be >= 0")
        require(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step, "must be >= 1")
        require(self.micro_batch_prompts >= 1, "micro_batch_prompts", self.micro_batch_prompts, "must be >= 1")
        require(1 <= self.length_multiple <= 4096, "length_multiple", self.length_multiple, "must be between 1 and 4096")
        require(1 <= self.updates_per_step <= self.prompts_per_step, "updates_per_step", self.updates_per_step,
                f"must be in [1, prompts_per_step={self.prompts_per_step}]")
        require(self.logprob_chunk_tokens >= 0, "logprob_chunk_tokens", self.logprob_chunk_tokens,
                "must be >= 0 (0 = the whole micro-batch at once)")
        require(self.eval_interval >= 0, "eval_interval", self.eval_interval, "must be >= 0")
        require(self.eval_samples >= 1, "eval_samples", self.eval_samples, "must be >= 1")
        require(self.eval_max_prompts >= 1, "eval_max_prompts", self.eval_max_prompts, "must be >= 1")
        require(self.log_interval >= 1, "log_interval", self.log_interval, "must be >= 1")
        require(self.loss.tis_imp_ratio_cap is None or self.old_logprobs == "recompute", "loss.tis_imp_ratio_cap",
                self.loss.tis_imp_ratio_cap, f"needs grpo.old_logprobs: recompute (got {self.old_logprobs!r}: the "
                "old log-probs are then the engine's own and there is no mismatch to correct)")
