"""Time of a CROPI run at scale, by arithmetic: behaviour rollouts, scoring, GRPO steps per stage.

Pure functions of a :class:`StageShape` (model size, layout, sampling, batch sizes and pool sizes) and
the throughput assumptions below; nothing runs a model. ``benchmarks/cost_model.py`` prices the example
configs with it (``docs/at_scale.md`` §3) and ``cropi run --dry-run`` prints a run's estimate
(:func:`estimate_run_time`, :func:`estimate_run_disk`). A stage is its scoring of the pool and the
target sets plus ``steps_per_stage`` GRPO steps (rollout + train); the behaviour rollouts come once per
run (and once per behaviour refresh). With ``curriculum.background_scoring`` a selecting stage's scoring
runs beside its steps on devices of its own (:func:`background_stage`): the stage takes the longer of
the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_cropi.selection.policies import uses_behaviour_rollouts

__all__ = ["StageShape", "ScoringOptions", "shape_from_config", "estimate_run_time", "stage_row", "scoring_seconds",
           "background_stage",
           "behaviour_seconds", "grpo_step_seconds", "grpo_row_lengths", "padding_profile", "estimate_run_disk", "ASSUMPTIONS",
           "DISK_ASSUMPTIONS"]

# ------------------------------------------------------------------ assumptions, each a constant
H100_BF16_PEAK_FLOPS = 989e12        # H100 SXM dense bf16 peak, FLOP/s per GPU
MFU = 0.35                           # achieved share of the peak, scoring and training alike
GPUS_PER_NODE = 8                    # one node = 8 × H100 80 GB
SCORING_FLOPS_PER_PARAM_TOKEN = 8    # forward + recomputed forward + input grads + per-prompt weight grads
GRPO_FLOPS_PER_PARAM_TOKEN = 12      # policy fwd + recompute + backward (8N) + reference and old-policy fwds
ATTENTION_FLOPS_PER_TOKEN_LAYER = 4  # × padded length × heads·head_dim: QKᵀ and AV of one forward, no causal saving
SCORING_ATTENTION_PASSES = 4         # attention forwards per scoring token (fwd, recompute, 2 for backward)
GRPO_ATTENTION_PASSES = 6            # the same for a GRPO token (12N / 2N)
VLLM_TOKENS_PER_S = {"qwen2.5-1.5b": 20_000, "qwen2.5-7b": 10_000}   # output tokens/s per engine (one per DP replica)
MEAN_RESPONSE_TOKENS = {"qwen2.5-1.5b": 500, "qwen2.5-7b": 600}     # mean sampled response length
DECODE_STEP_S = {"qwen2.5-1.5b": 0.015, "qwen2.5-7b": 0.025}        # one decode step: a rollout takes ≥ max_tokens of them
PROMPT_TOKENS = 150                     # mean prompt with chat template + system prompt (assumed; only bucketing uses it)
RESPONSE_LENGTH_SIGMA = 1.0             # response lengths: log-normal, σ = 1, mean as above, clipped at max_tokens
                                        # (the distribution of benchmarks/scoring_options.py, there scaled to 24/192)
LENGTH_SEED = 0                         # seed of the sampled response lengths
# Presets without a measured entry above: power laws through the two anchors (1.5B and 7.6B parameters),
# decode being memory-bound: tokens/s ∝ N^-0.43, a decode step ∝ N^0.32; mean response = this share of
# rollout.max_tokens.
ANCHOR_PARAMS = 7.6e9
MEAN_RESPONSE_SHARE = 0.25

STORE_BYTES_PER_RESPONSE_TOKEN = 8   # trajectory store: int32 token id + float32 behaviour log-prob
STORE_BYTES_PER_PROMPT_TOKEN = 4     # int32 prompt token ids, once per prompt
OPTIMIZER_BYTES_PER_PARAM = 12       # fp32 main weights + Adam's two moments in a checkpoint

DISK_ASSUMPTIONS = ("trajectory stores: prompts × K × mean response tokens × 8 B (token id + log-prob) + prompt "
                    "tokens × 4 B; feature stores: (pool + target prompts) × k × feature dtype, per stage kept; "
                    "checkpoints: params × (weight bytes + 12 B optimizer) × kept (reference model not counted); "
                    "HF exports: params × weight bytes (final, warm-up)")

ASSUMPTIONS = (f"H100 SXM bf16 peak {H100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s per GPU at MFU {MFU}; scoring "
               f"{SCORING_FLOPS_PER_PARAM_TOKEN}N and GRPO {GRPO_FLOPS_PER_PARAM_TOKEN}N FLOPs per token (+ attention); "
               "vLLM output tokens/s per DP replica 20k (1.5B) / 10k (7B); mean response 500 / 600 tokens "
               f"(other models: {MEAN_RESPONSE_SHARE:.0%} of rollout.max_tokens); every pool prompt scored (skipping "
               "zero-variance prompts only lowers it); warm-up and evaluations not counted")


@dataclass(frozen=True)
class StageShape:
    """What the arithmetic needs from one run config and its launch."""

    label: str
    preset: str
    params: int             # N, every parameter counted once (the HF size)
    layer_params: int       # one decoder layer
    output_params: int      # the output layer V × h (the embedding, if tied)
    tied: bool
    layers: int
    attention_width: int    # heads × head_dim
    gpus: int               # the launch's world size
    tp: int
    pp: int
    max_prompt_tokens: int
    max_tokens: int
    grpo_samples: int
    pool_samples: int
    target_samples: int
    prompts_per_step: int
    micro_batch_prompts: int
    steps_per_stage: int
    stages: int
    scoring_microbatches_per_call: int
    selection_ratio: float
    pool_prompts: int
    target_prompts: int     # scored every stage (all target sets together)
    vllm_tokens_per_s: float
    mean_response_tokens: float
    decode_step_s: float
    nodes: int = 1
    grpo_length_aware: bool = False  # grpo.length_aware_microbatches (applied at PP = 1 only, as the trainer does)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def seq(self) -> int:
        """Padded sequence today: every sequence padded to the pool's longest prompt + response."""
        return self.max_prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class ScoringOptions:
    """The ``scoring.*`` options the model prices (defaults: none on)."""

    bucketed: bool = False             # max_tokens_per_microbatch > 0 (exact)
    zero_variance_share: float = 0.0   # share of pool prompts with all-equal behaviour rewards, skipped (exact)
    responses: int = 0                 # max_responses_per_prompt (0 = all; caps pool and target alike)
    shortlist: float = 1.0             # shortlist.fraction of the live pool at stages ≥ 1 (stage 0 scores all)
    last_layers: int = 0               # with truncate_backward: only the last L layers (+ norm, output layer)


def throughput(preset: str, params: int, max_tokens: int) -> tuple[float, float, float]:
    """``(vLLM output tokens/s per replica, mean response tokens, seconds per decode step)`` of a model:
    the measured-by-assumption table for the Qwen2.5 presets, the power laws otherwise."""
    short = preset.removesuffix("-instruct")
    if short in VLLM_TOKENS_PER_S:
        return VLLM_TOKENS_PER_S[short], MEAN_RESPONSE_TOKENS[short], DECODE_STEP_S[short]
    scale = ANCHOR_PARAMS / max(params, 1)
    return (VLLM_TOKENS_PER_S["qwen2.5-7b"] * scale ** 0.43, max(1.0, MEAN_RESPONSE_SHARE * max_tokens),
            DECODE_STEP_S["qwen2.5-7b"] * scale ** -0.32)


def shape_from_config(cfg, *, world_size: int, pool_prompts: int, target_prompts: int, label: str = "",
                      nodes: int = 1, seq_length: int | None = None) -> StageShape:
    """The :class:`StageShape` of a :class:`~megatron_cropi.run_config.RunConfig` launched on ``world_size``
    ranks (``seq_length``: the padded length, default ``data.max_prompt_tokens + rollout.max_tokens``)."""
    from megatron_cropi.memory import ModelShape, stage_parameter_counts

    shape = ModelShape.from_model_config(cfg.model)
    params = sum(stage_parameter_counts(shape, tp=1, pp=1))
    output = shape.vocab * shape.hidden
    layer = (params - output * (1 if shape.tied else 2) - shape.hidden) // shape.num_layers
    max_tokens = cfg.rollout.max_tokens
    prompt_tokens = (seq_length - max_tokens) if seq_length else cfg.data.max_prompt_tokens
    tokens_per_s, mean_response, decode_s = throughput(cfg.model.preset, params, max_tokens)
    return StageShape(
        label=label, preset=cfg.model.preset, params=params, layer_params=layer, output_params=output,
        tied=shape.tied, layers=shape.num_layers, attention_width=shape.heads * shape.head_dim, gpus=world_size,
        tp=cfg.parallel.tensor_model_parallel_size, pp=cfg.parallel.pipeline_model_parallel_size,
        max_prompt_tokens=prompt_tokens, max_tokens=max_tokens, grpo_samples=cfg.rollout.n,
        pool_samples=cfg.curriculum.pool_samples, target_samples=cfg.curriculum.target_samples,
        prompts_per_step=cfg.grpo.prompts_per_step, micro_batch_prompts=cfg.grpo.micro_batch_prompts,
        steps_per_stage=cfg.curriculum.steps_per_stage, stages=cfg.curriculum.stages,
        scoring_microbatches_per_call=cfg.scoring.microbatches_per_call, selection_ratio=cfg.selection.ratio,
        pool_prompts=pool_prompts, target_prompts=target_prompts, vllm_tokens_per_s=tokens_per_s,
        mean_response_tokens=mean_response, decode_step_s=decode_s, nodes=nodes,
        grpo_length_aware=cfg.grpo.length_aware_microbatches)


def cluster_flops(run: StageShape) -> float:
    """Achieved FLOP/s of the whole launch."""
    return run.gpus * H100_BF16_PEAK_FLOPS * MFU


def pipeline_bubble(pp: int, microbatches: int) -> float:
    """1F1B time factor ``(m + p − 1) / m``."""
    return (microbatches + pp - 1) / microbatches


# ------------------------------------------------------------------ padding
def sampled_response_lengths(n: int, mean: float, max_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Clipped log-normal response lengths in ``[1, max_tokens]`` with (pre-clip) mean ``mean``."""
    mu = math.log(mean) - RESPONSE_LENGTH_SIGMA ** 2 / 2
    return np.clip(np.round(rng.lognormal(mu, RESPONSE_LENGTH_SIGMA, n)), 1, max_tokens).astype(np.int64)


def bucketed_row_lengths(longest: np.ndarray, *, prompts_per_call: int, multiple: int, cap: int) -> np.ndarray:
    """Padded length of each prompt's rows under length-aware micro-batches (``popi/buckets.py`` with one
    prompt per micro-batch, as in every example): lengths rounded up to ``multiple``, sorted, cut into calls
    of ``prompts_per_call`` prompts, each padded to its call's longest."""
    padded = np.minimum(-(-np.maximum(longest, 1) // multiple) * multiple, cap)
    ordered = np.sort(padded)
    call_max = np.maximum.reduceat(ordered, np.arange(0, ordered.size, prompts_per_call))
    return np.repeat(call_max, prompts_per_call)[: ordered.size]


def padding_profile(*, prompts: int, responses: int, prompt_tokens: int, mean_response: float, max_tokens: int,
                    seq: int, prompts_per_call: int, multiple: int = 8, seed: int = LENGTH_SEED) -> dict:
    """Real and padded positions per row, padded to ``seq`` vs length-bucketed; ``sq``: mean padded length²
    per row (attention)."""
    rng = np.random.default_rng(seed)
    lengths = sampled_response_lengths(prompts * responses, mean_response, max_tokens, rng).reshape(prompts, responses)
    real = float((prompt_tokens + lengths).mean())
    rows = bucketed_row_lengths(prompt_tokens + lengths.max(axis=1), prompts_per_call=prompts_per_call,
                                multiple=multiple, cap=seq).astype(np.float64)
    return {"real": real, "response_mean": float(lengths.mean()), "padded": float(seq), "padded_sq": float(seq) ** 2,
            "bucketed": float(rows.mean()), "bucketed_sq": float((rows ** 2).mean()),
            "padding_fraction_padded": 1 - real / seq, "padding_fraction_bucketed": 1 - real / float(rows.mean())}



# ------------------------------------------------------------------ time
def scoring_flops_per_row(run: StageShape, length: float, length_sq: float, last_layers: int = 0) -> float:
    """FLOPs to score one response row padded to ``length`` (``length_sq``: its mean square, for attention).
    With ``last_layers`` L and a truncated backward: the forward runs every layer; recompute, input grads
    and weight grads cover the last L layers and the output layer only (weight grads of the output layer
    only if untied); priced as a ratio of the 8N matmul FLOPs."""
    attention_fwd = ATTENTION_FLOPS_PER_TOKEN_LAYER * run.attention_width * run.layers * length_sq
    if not last_layers:
        return SCORING_FLOPS_PER_PARAM_TOKEN * run.params * length + SCORING_ATTENTION_PASSES * attention_fwd
    matmul = run.layers * run.layer_params + run.output_params
    through = last_layers * run.layer_params + run.output_params
    scored = last_layers * run.layer_params + (0 if run.tied else run.output_params)
    linear_share = (2 * matmul + 2 * through + 2 * through + 2 * scored) / (8 * matmul)
    attention_passes = 1 + (SCORING_ATTENTION_PASSES - 1) * last_layers / run.layers
    return SCORING_FLOPS_PER_PARAM_TOKEN * run.params * length * linear_share + attention_passes * attention_fwd


def scored_prompts(run: StageShape, opts: ScoringOptions, live_share: float, stage: int) -> float:
    """Pool prompts scored at ``stage``: the live ones, or the shortlist of them at stages ≥ 1 (never fewer
    than the selection's budget)."""
    live = run.pool_prompts * live_share
    if opts.shortlist >= 1.0 or stage == 0:
        return live
    return min(live, max(opts.shortlist * live, run.selection_ratio * run.pool_prompts))


def scoring_seconds(run: StageShape, opts: ScoringOptions, *, target_samples: int | None = None,
                    live_share: float | None = None, stage: int | None = None) -> float:
    """Scoring of the pool and the target set at one stage (``stage=None``: the mean over the run's stages)."""
    if stage is None:
        return sum(scoring_seconds(run, opts, target_samples=target_samples, live_share=live_share, stage=m)
                   for m in range(run.stages)) / run.stages
    live_share = 1.0 - opts.zero_variance_share if live_share is None else live_share
    total = 0.0
    for prompts, samples in ((scored_prompts(run, opts, live_share, stage), run.pool_samples),
                             (run.target_prompts, target_samples or run.target_samples)):
        k = min(samples, opts.responses) if opts.responses else samples
        if opts.bucketed:
            prof = padding_profile(prompts=4096, responses=k, prompt_tokens=PROMPT_TOKENS,
                                   mean_response=run.mean_response_tokens, max_tokens=run.max_tokens,
                                   seq=run.seq, prompts_per_call=run.scoring_microbatches_per_call)
            length, length_sq = prof["bucketed"], prof["bucketed_sq"]
        else:
            length, length_sq = run.seq, run.seq ** 2
        total += prompts * k * scoring_flops_per_row(run, length, length_sq, opts.last_layers)
    return total / cluster_flops(run) * pipeline_bubble(run.pp, run.scoring_microbatches_per_call)


def behaviour_seconds(run: StageShape, target_samples: int | None = None) -> float:
    """The behaviour rollouts of the pool and the target set (once per run, or per refresh)."""
    tokens = (run.pool_prompts * run.pool_samples + run.target_prompts * (target_samples or run.target_samples)) \
        * run.mean_response_tokens
    return tokens / (run.vllm_tokens_per_s * run.dp)


def grpo_row_lengths(run: StageShape, *, steps: int = 64, seed: int = LENGTH_SEED) -> tuple[float, float]:
    """``(mean, mean square)`` padded length of a GRPO training row. Padded: every row to ``seq``. With
    ``grpo_length_aware`` at PP = 1 (``grpo/update.py``): a rank's groups sorted by their longest
    prompt + response, cut into micro-batches of ``micro_batch_prompts`` groups, each padded to its own
    longest (a multiple of 8), over ``steps`` sampled steps of the log-normal lengths."""
    if not run.grpo_length_aware or run.pp > 1:
        return float(run.seq), float(run.seq) ** 2
    per_rank = max(1, run.prompts_per_step // run.dp)
    rng = np.random.default_rng(seed)
    lengths = sampled_response_lengths(steps * per_rank * run.grpo_samples, run.mean_response_tokens,
                                       run.max_tokens, rng).reshape(steps, per_rank, run.grpo_samples)
    rows = np.concatenate([bucketed_row_lengths(PROMPT_TOKENS + step.max(axis=1), multiple=8, cap=run.seq,
                                                prompts_per_call=max(1, run.micro_batch_prompts))
                           for step in lengths]).astype(np.float64)
    return float(rows.mean()), float((rows ** 2).mean())


def grpo_step_seconds(run: StageShape) -> tuple[float, float]:
    """``(rollout, train)`` seconds of one GRPO step; training rows padded as :func:`grpo_row_lengths`."""
    sequences = run.prompts_per_step * run.grpo_samples
    rollout = max(run.max_tokens * run.decode_step_s,
                  sequences * run.mean_response_tokens / (run.vllm_tokens_per_s * run.dp))
    length, length_sq = grpo_row_lengths(run)
    attention = ATTENTION_FLOPS_PER_TOKEN_LAYER * run.attention_width * run.layers * length_sq
    flops = sequences * (GRPO_FLOPS_PER_PARAM_TOKEN * run.params * length + GRPO_ATTENTION_PASSES * attention)
    microbatches = max(1, run.prompts_per_step // (run.micro_batch_prompts * run.dp))
    return rollout, flops / cluster_flops(run) * pipeline_bubble(run.pp, microbatches)


def background_stage(scoring_s: float, steps_s: float, *, scoring_gpus: float = 1.0) -> dict:
    """A selecting stage with its scoring off the critical path (``curriculum.background_scoring`` with an
    external scoring job on GPUs of its own, ``scoring_gpus`` times as many as training has): the stage
    trains its steps on the whole pool while the job scores, and switches to the selection when it is there;
    a job slower than the stage is waited for at the stage's end.

    Returns:
        ``stage_s`` = max(steps, scoring / scoring_gpus) (exporting θ_m not counted);
        ``switch_fraction`` = min(scoring / scoring_gpus / steps, 1), the share of the stage's steps that train
        on the whole pool; ``critical_scoring_share``, the part of the stage spent waiting for scoring;
        ``gpu_hours_scoring_share``, scoring's share of the stage's GPU-hours (scoring + steps, each × its
        GPUs): what moving it off the critical path does not change.
    """
    scoring_wall = scoring_s / scoring_gpus
    stage = max(steps_s, scoring_wall)
    return {"stage_s": stage, "switch_fraction": min(scoring_wall / steps_s, 1.0) if steps_s > 0 else 1.0,
            "critical_scoring_share": (stage - steps_s) / stage if stage > 0 else 0.0,
            "gpu_hours_scoring_share": scoring_s / (scoring_s + steps_s) if scoring_s + steps_s > 0 else 0.0}


def stage_row(run: StageShape, opts: ScoringOptions = ScoringOptions(), *, target_samples: int | None = None,
              live_share: float | None = None) -> dict:
    """One row of §3's table, seconds and hours; ``background``: the same stage with its scoring off the
    critical path (:func:`background_stage`, with as many and with half as many scoring GPUs)."""
    rollout, train = grpo_step_seconds(run)
    steps = run.steps_per_stage * (rollout + train)
    scoring = scoring_seconds(run, opts, target_samples=target_samples, live_share=live_share)
    background = background_stage(scoring, steps)
    return {"config": run.label, "behaviour_rollouts_h": behaviour_seconds(run, target_samples) / 3600,
            "scoring_per_stage_h": scoring / 3600, "grpo_step_s": rollout + train, "grpo_rollout_s": rollout,
            "grpo_train_s": train, "steps_per_stage": run.steps_per_stage, "grpo_steps_h": steps / 3600,
            "stage_h": (scoring + steps) / 3600, "scoring_share": scoring / (scoring + steps),
            "background": {"stage_h": background["stage_s"] / 3600, "switch_fraction": background["switch_fraction"],
                           "switch_fraction_half_scoring_gpus":
                               background_stage(scoring, steps, scoring_gpus=0.5)["switch_fraction"],
                           "critical_scoring_share": background["critical_scoring_share"]}}


def options_from_config(cfg) -> ScoringOptions:
    """The scoring options a config turns on (the zero-variance share is unknown before the rollouts: 0)."""
    s = cfg.scoring
    return ScoringOptions(bucketed=s.max_tokens_per_microbatch > 0, responses=s.max_responses_per_prompt,
                          shortlist=s.shortlist.fraction, last_layers=s.last_layers if s.truncate_backward else 0)


def estimate_run_time(cfg, shape: StageShape) -> dict:
    """Seconds per stage (scoring, the mean over the run's stages, + GRPO steps) and for the run: ``stages ×
    steps + the selecting stages' scoring + behaviour rollouts`` (once, plus one per refresh of a selecting
    stage; ``curriculum.selected_stages``: the first stages select, stage 0 scoring the whole live pool;
    ``curriculum.select_every``: the stages that hold an earlier selection score nothing).
    With ``curriculum.background_scoring`` a selecting stage takes max(steps, scoring) (:func:`background_stage`:
    a scoring job with as many GPUs as training); the run is charged only the waits, and
    ``scoring_all_stages_s`` is then the scoring job's own time. With ``curriculum.background_rollouts`` the job
    also makes the behaviour rollouts (stage 0, each refresh stage) before it scores: the run is charged none of
    them, only a longer wait where rollouts and scoring together outlast the stage's steps.
    Policies other than ``cropi`` score nothing; ``full``, ``random`` and ``online_learnability`` have no
    behaviour rollouts (the latter's per-stage pool rollouts are not priced)."""
    rollout, train = grpo_step_seconds(shape)
    steps = shape.steps_per_stage * (rollout + train)
    policy = cfg.selection.policy
    selecting = min(cfg.curriculum.selecting_stages, shape.stages)  # the rest: the whole pool
    scoring = scoring_seconds(shape, options_from_config(cfg)) if policy == "cropi" else 0.0
    # the selecting stages are the first ones: stage 0 scores the whole live pool, a shortlist the later ones;
    # curriculum.select_every: the stages that hold an earlier selection score nothing
    scored = cfg.curriculum.scoring_stages(shape.stages)
    scoring_all = (sum(scoring_seconds(shape, options_from_config(cfg), stage=m) for m in scored)
                   if policy == "cropi" else 0.0)
    rollouts_needed = uses_behaviour_rollouts(policy)
    every = cfg.curriculum.refresh_behaviour_every
    refreshes = (selecting - 1) // every if every and rollouts_needed else 0
    behaviour = behaviour_seconds(shape) * (1 + refreshes) if rollouts_needed else 0.0
    stage, waited = scoring + steps, scoring_all  # scoring on the critical path: all of it, or (background) the wait
    background = bool(cfg.curriculum.background_scoring) and policy == "cropi"
    # curriculum.background_rollouts: the scoring job rolls out first at stage 0 and each refresh stage
    in_job = background and bool(cfg.curriculum.background_rollouts)
    rolled = {m: behaviour_seconds(shape) if in_job and (m == 0 or (every and m % every == 0)) else 0.0 for m in scored}
    if background:
        stage = background_stage(scoring, steps)["stage_s"]
        waited = sum(background_stage(scoring_seconds(shape, options_from_config(cfg), stage=m) + rolled[m],
                                      steps)["stage_s"] - steps for m in scored)
    return {"grpo_step_s": rollout + train, "grpo_rollout_s": rollout, "grpo_train_s": train,
            "scoring_per_stage_s": scoring, "grpo_steps_per_stage_s": steps, "stage_s": stage,
            "behaviour_rollouts_s": behaviour, "behaviour_refreshes": refreshes, "selecting_stages": selecting,
            "scoring_stages": len(scored) if policy == "cropi" else 0,
            "scoring_all_stages_s": scoring_all, "background_scoring": background, "scoring_waits_s": waited,
            "background_scorer": cfg.curriculum.background_scorer,
            "switch_fraction": background_stage(scoring, steps)["switch_fraction"] if background else 0.0,
            "background_rollouts": in_job,
            "total_s": shape.stages * steps + waited + (0.0 if in_job else behaviour), "stages": shape.stages,
            "pool_prompts": shape.pool_prompts, "target_prompts": shape.target_prompts,
            "vllm_tokens_per_s": shape.vllm_tokens_per_s, "mean_response_tokens": shape.mean_response_tokens,
            "assumptions": ASSUMPTIONS}


def estimate_run_disk(cfg, shape: StageShape) -> dict:
    """Bytes the run leaves on disk at its end: trajectory stores, feature stores, checkpoints, HF exports
    (:data:`DISK_ASSUMPTIONS`)."""
    from megatron_cropi.memory import feature_store_bytes

    policy = cfg.selection.policy
    rollouts_needed = uses_behaviour_rollouts(policy)
    every = cfg.curriculum.refresh_behaviour_every
    selecting = min(cfg.curriculum.selecting_stages, shape.stages)  # the rest: the whole pool
    rolled = 1 + ((selecting - 1) // every if every else 0)
    prompt_bytes = (shape.pool_prompts + shape.target_prompts) * shape.max_prompt_tokens * STORE_BYTES_PER_PROMPT_TOKEN
    response_bytes = ((shape.pool_prompts * shape.pool_samples + shape.target_prompts * shape.target_samples)
                      * shape.mean_response_tokens * STORE_BYTES_PER_RESPONSE_TOKEN)
    stores = (prompt_bytes + response_bytes) * rolled if rollouts_needed else 0
    kept_stages = 1 if cfg.curriculum.keep_features == "resume" else len(cfg.curriculum.scoring_stages(shape.stages))
    per_stage = feature_store_bytes(shape.pool_prompts + shape.target_prompts, cfg.projection.k,
                                    cfg.scoring.feature_dtype) if policy == "cropi" else 0
    weight_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.params_dtype]
    ckpt = cfg.grpo.checkpoint
    total_steps = shape.stages * shape.steps_per_stage
    saves = (total_steps // ckpt.save_interval if ckpt.save_interval else 0) + 1  # every interval and the end
    kept_ckpts = min(saves, ckpt.keep_last) if ckpt.keep_last else saves
    checkpoints = shape.params * (weight_bytes + OPTIMIZER_BYTES_PER_PARAM) * kept_ckpts
    exports = shape.params * weight_bytes * (1 + int(cfg.curriculum.warmup.enabled))
    parts = {"trajectory_stores": int(stores), "feature_stores": int(per_stage * kept_stages),
             "checkpoints": int(checkpoints), "hf_exports": int(exports)}
    return {"bytes": parts, "total_bytes": sum(parts.values()), "feature_stages_kept": kept_stages,
            "checkpoints_kept": kept_ckpts, "assumptions": DISK_ASSUMPTIONS}
