"""GPU time of one CROPI curriculum stage at scale, computed (``docs/at_scale.md`` §3).

Pure arithmetic on the example configs (read with :func:`megatron_cropi.run_config.load_run_config`;
model sizes from :mod:`megatron_cropi.memory`) and the throughput assumptions below. Nothing here runs
a model or needs a GPU. Per config it gives the behaviour rollouts (once per run), the scoring of the pool
and the target set (every stage), a GRPO step (rollout + train), 100 steps and the stage, then scoring's
share of the stage with the scoring options of ``scoring.*``: exact ones (length-aware micro-batches,
zero-variance prompts skipped) and lossy ones (fewer responses, a pool shortlist, a truncated backward),
each lossy option with its selection quality *measured on CPU* (read from ``benchmarks/results/``).

    python benchmarks/cost_model.py          # one JSON line; the full result: benchmarks/results/cost_model.json
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# ------------------------------------------------------------------ assumptions (§3), each a constant
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
POOL_PROMPTS = 7_473 + 7_500 + 40_315   # GSM8K-train + MATH-train + DeepScaleR = 55,288
TARGET_PROMPTS = 1_000                  # target prompts scored every stage
PROMPT_TOKENS = 150                     # mean prompt with chat template + system prompt (assumed; only bucketing uses it)
RESPONSE_LENGTH_SIGMA = 1.0             # response lengths: log-normal, σ = 1, mean as above, clipped at max_tokens
                                        # (the distribution of benchmarks/scoring_options.py, there scaled to 24/192)
LENGTH_SEED = 0                         # seed of the sampled response lengths
SCORED_TARGET_SAMPLES_IN_OLD_TABLE = {"qwen2.5-1.5b": 16, "qwen2.5-7b": 8}   # what §3 was first computed with
TARGET_SHARE = 0.15                     # the issue's bar: scoring ≤ 15% of a stage's GPU time

EXAMPLES = (  # (label, config file, nodes): DP comes from the launch's world size, not from the file
    ("1.5B, 1 node", "qwen2.5-1.5b-instruct_1node.yaml", 1),
    ("1.5B, 2 nodes", "qwen2.5-1.5b-instruct_2node.yaml", 2),
    ("7B, 1 node", "qwen2.5-7b-instruct_1node.yaml", 1),
    ("7B, 2 nodes", "qwen2.5-7b-instruct_2node.yaml", 2),
    ("7B, 4 nodes", "qwen2.5-7b-instruct_4node.yaml", 4),
)


@dataclass(frozen=True)
class ExampleRun:
    """What the arithmetic needs from one example config and its launch."""

    label: str
    preset: str
    params: int             # N, every parameter counted once (the HF size)
    layer_params: int       # one decoder layer
    output_params: int      # the output layer V × h (the embedding, if tied)
    tied: bool
    layers: int
    attention_width: int    # heads × head_dim
    nodes: int
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

    @property
    def gpus(self) -> int:
        return self.nodes * GPUS_PER_NODE

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def seq(self) -> int:
        """Padded sequence today: every sequence padded to the pool's longest prompt + response."""
        return self.max_prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class ScoringOptions:
    """The ``scoring.*`` options the model prices (defaults: today's examples, none on)."""

    bucketed: bool = False             # max_tokens_per_microbatch > 0 (exact)
    zero_variance_share: float = 0.0   # share of pool prompts with all-equal behaviour rewards, skipped (exact)
    responses: int = 0                 # max_responses_per_prompt (0 = all; caps pool and target alike)
    shortlist: float = 1.0             # shortlist.fraction of the live pool at stages ≥ 1 (stage 0 scores all)
    last_layers: int = 0               # with truncate_backward: only the last L layers (+ norm, output layer)


def read_example(label: str, filename: str, nodes: int) -> ExampleRun:
    """One example config through the project's loader (placeholders filled with dummy paths)."""
    from megatron_cropi.memory import ModelShape, stage_parameter_counts
    from megatron_cropi.run_config import load_run_config

    cfg = load_run_config(ROOT / "examples" / "configs" / filename, environ={"DATA_DIR": "/data", "MODEL_DIR": "/model"})
    shape = ModelShape.from_model_config(cfg.model)
    params = sum(stage_parameter_counts(shape, tp=1, pp=1))
    output = shape.vocab * shape.hidden
    layer = (params - output * (1 if shape.tied else 2) - shape.hidden) // shape.num_layers
    return ExampleRun(
        label=label, preset=cfg.model.preset, params=params, layer_params=layer, output_params=output,
        tied=shape.tied, layers=shape.num_layers, attention_width=shape.heads * shape.head_dim, nodes=nodes,
        tp=cfg.parallel.tensor_model_parallel_size, pp=cfg.parallel.pipeline_model_parallel_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens, max_tokens=cfg.rollout.max_tokens, grpo_samples=cfg.rollout.n,
        pool_samples=cfg.curriculum.pool_samples, target_samples=cfg.curriculum.target_samples,
        prompts_per_step=cfg.grpo.prompts_per_step, micro_batch_prompts=cfg.grpo.micro_batch_prompts,
        steps_per_stage=cfg.curriculum.steps_per_stage, stages=cfg.curriculum.stages,
        scoring_microbatches_per_call=cfg.scoring.microbatches_per_call, selection_ratio=cfg.selection.ratio)


def cluster_flops(run: ExampleRun) -> float:
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


def cpu_padding_cross_check() -> dict:
    """The same padding arithmetic on ``benchmarks/scoring_options.py``'s CPU pool (prompt 16, K = 8, mean 24,
    max 192, 8 prompts per call; its expectation over 64× its 128 prompts) next to what that benchmark measured
    on its one sample of 128 prompts, and the measured cost of batched capture over a bare forward + backward."""
    measured = json.loads((RESULTS / "scoring_options.json").read_text())["padding"]
    capture = json.loads((RESULTS / "capture_quick.json").read_text())
    prof = padding_profile(prompts=128 * 64, responses=8, prompt_tokens=16, mean_response=24, max_tokens=192, seq=208,
                           prompts_per_call=8)
    return {"computed_padding_fraction_padded": round(prof["padding_fraction_padded"], 3),
            "computed_padding_fraction_bucketed": round(prof["padding_fraction_bucketed"], 3),
            "computed_position_ratio": round(prof["padded"] / prof["bucketed"], 2),
            "measured_padding_fraction_padded": round(measured["padded"]["padding_fraction"], 3),
            "measured_padding_fraction_bucketed": round(measured["bucketed"]["padding_fraction"], 3),
            "measured_position_ratio": round(measured["padded"]["padded_tokens"] / measured["bucketed"]["padded_tokens"], 2),
            "measured_real_tokens_per_s_speedup": round(measured["speedup"], 2),
            "measured_batched_capture_over_bare_fwd_bwd": round(capture["overhead_vs_bare"], 3)}


# ------------------------------------------------------------------ time
def scoring_flops_per_row(run: ExampleRun, length: float, length_sq: float, last_layers: int = 0) -> float:
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


def scored_prompts(run: ExampleRun, opts: ScoringOptions, live_share: float, stage: int) -> float:
    """Pool prompts scored at ``stage``: the live ones, or the shortlist of them at stages ≥ 1 (never fewer
    than the selection's budget)."""
    live = POOL_PROMPTS * live_share
    if opts.shortlist >= 1.0 or stage == 0:
        return live
    return min(live, max(opts.shortlist * live, run.selection_ratio * POOL_PROMPTS))


def scoring_seconds(run: ExampleRun, opts: ScoringOptions, *, target_samples: int | None = None,
                    live_share: float | None = None, stage: int | None = None) -> float:
    """Scoring of the pool and the target set at one stage (``stage=None``: the mean over the run's stages)."""
    if stage is None:
        return sum(scoring_seconds(run, opts, target_samples=target_samples, live_share=live_share, stage=m)
                   for m in range(run.stages)) / run.stages
    live_share = 1.0 - opts.zero_variance_share if live_share is None else live_share
    total = 0.0
    for prompts, samples in ((scored_prompts(run, opts, live_share, stage), run.pool_samples),
                             (TARGET_PROMPTS, target_samples or run.target_samples)):
        k = min(samples, opts.responses) if opts.responses else samples
        if opts.bucketed:
            prof = padding_profile(prompts=4096, responses=k, prompt_tokens=PROMPT_TOKENS,
                                   mean_response=MEAN_RESPONSE_TOKENS[run.preset], max_tokens=run.max_tokens,
                                   seq=run.seq, prompts_per_call=run.scoring_microbatches_per_call)
            length, length_sq = prof["bucketed"], prof["bucketed_sq"]
        else:
            length, length_sq = run.seq, run.seq ** 2
        total += prompts * k * scoring_flops_per_row(run, length, length_sq, opts.last_layers)
    return total / cluster_flops(run) * pipeline_bubble(run.pp, run.scoring_microbatches_per_call)


def behaviour_seconds(run: ExampleRun, target_samples: int | None = None) -> float:
    """The behaviour rollouts of the pool and the target set (once per run, or per refresh)."""
    tokens = (POOL_PROMPTS * run.pool_samples + TARGET_PROMPTS * (target_samples or run.target_samples)) \
        * MEAN_RESPONSE_TOKENS[run.preset]
    return tokens / (VLLM_TOKENS_PER_S[run.preset] * run.dp)


def grpo_step_seconds(run: ExampleRun) -> tuple[float, float]:
    """``(rollout, train)`` seconds of one GRPO step; training pads every sequence to ``seq``."""
    sequences = run.prompts_per_step * run.grpo_samples
    rollout = max(run.max_tokens * DECODE_STEP_S[run.preset],
                  sequences * MEAN_RESPONSE_TOKENS[run.preset] / (VLLM_TOKENS_PER_S[run.preset] * run.dp))
    attention = ATTENTION_FLOPS_PER_TOKEN_LAYER * run.attention_width * run.layers * run.seq
    flops = sequences * run.seq * (GRPO_FLOPS_PER_PARAM_TOKEN * run.params + GRPO_ATTENTION_PASSES * attention)
    microbatches = run.prompts_per_step // (run.micro_batch_prompts * run.dp)
    return rollout, flops / cluster_flops(run) * pipeline_bubble(run.pp, microbatches)


def stage_row(run: ExampleRun, opts: ScoringOptions = ScoringOptions(), *, target_samples: int | None = None,
              live_share: float | None = None) -> dict:
    """One row of §3's table, seconds and hours."""
    rollout, train = grpo_step_seconds(run)
    steps = run.steps_per_stage * (rollout + train)
    scoring = scoring_seconds(run, opts, target_samples=target_samples, live_share=live_share)
    return {"config": run.label, "behaviour_rollouts_h": behaviour_seconds(run, target_samples) / 3600,
            "scoring_per_stage_h": scoring / 3600, "grpo_step_s": rollout + train, "grpo_rollout_s": rollout,
            "grpo_train_s": train, "steps_per_stage": run.steps_per_stage, "grpo_steps_h": steps / 3600,
            "stage_h": (scoring + steps) / 3600, "scoring_share": scoring / (scoring + steps)}


# ------------------------------------------------------------------ measured quality (CPU)
SHORTLIST_FALLBACK = {0.5: 0.48, 0.3: 0.35, 0.2: 0.29}   # benchmarks/shortlist.py, one 6-stage CPU run, if no json


def measured_quality() -> dict:
    """Selection quality of each option against full scoring, measured on CPU, from ``benchmarks/results/``."""
    options = json.loads((RESULTS / "scoring_options.json").read_text())
    rows = json.loads((RESULTS / "response_subsample.json").read_text())["rows"]
    cpu = options["subset_cpu_default"]
    live = rows[0]["pool_prompts_with_gradient"]
    by = {(r["pool_responses"], r["target_responses"]): r for r in rows}
    shortlist_path = RESULTS / "shortlist.json"
    if shortlist_path.exists():
        shortlist = json.loads(shortlist_path.read_text())
        source = "benchmarks/results/shortlist.json"
    else:
        shortlist = {"precision_at_10pct": {str(f): p for f, p in SHORTLIST_FALLBACK.items()}}
        source = "benchmarks/shortlist.py on one 6-stage CPU run (shortlist.json not in the tree)"
    return {
        "bucketed": {"exact": True, "max_rel_feature_diff": options["padding"]["max_rel_feature_diff"],
                     "source": "benchmarks/results/scoring_options.json"},
        "zero_variance": {"exact": True, "pool_prompts": cpu["pool_prompts"], "live_prompts": live,
                          "share": 1 - live / cpu["pool_prompts"],
                          "live_share_at_4_responses": by[(4, "all")]["pool_prompts_with_gradient"] / cpu["pool_prompts"],
                          "source": "benchmarks/results/response_subsample.json (CPU default, stage 0)"},
        "responses_4": {"precision_at_10pct": by[(4, "all")]["precision_at_10pct"], "spearman": by[(4, "all")]["spearman"],
                        "precision_at_10pct_target_8": by[(4, 8)]["precision_at_10pct"],
                        "spearman_target_8": by[(4, 8)]["spearman"],
                        "note": "pool 4 of 8 responses, target all 32; with the target cut to 8 as well: the "
                                "_target_8 figures; the key caps the target too (4 responses there: not measured)",
                        "source": "benchmarks/results/response_subsample.json"},
        "last_layers_half": {"precision_at_10pct": cpu["last1"]["precision_at_10pct"], "spearman": cpu["last1"]["spearman"],
                             "note": "last 1 of 2 layers of the CPU default; at 28 layers the same fraction is an "
                                     "analogue, not a measurement",
                             "source": "benchmarks/results/scoring_options.json"},
        "shortlist": {"precision_at_10pct": shortlist.get("precision_at_10pct", shortlist), "source": source,
                      "note": "stage-to-stage Spearman of influence scores ≈ 0 on that run: not recommended"},
    }


def lossy_quality(opts: ScoringOptions, quality: dict, layers: int) -> dict:
    """Each lossy option of ``opts`` with its measured precision@10% (combined: not measured)."""
    out = {}
    if opts.responses:  # the key caps the target too: the nearest measured point is pool 4 + target 8
        out["max_responses_per_prompt=4"] = quality["responses_4"]["precision_at_10pct_target_8"]
    if opts.shortlist < 1:
        out[f"shortlist.fraction={opts.shortlist}"] = float(quality["shortlist"]["precision_at_10pct"][str(opts.shortlist)])
    if opts.last_layers:
        out[f"last_layers={opts.last_layers}/{layers}+truncate_backward"] = quality["last_layers_half"]["precision_at_10pct"]
    return out


def exact_options(quality: dict) -> ScoringOptions:
    return ScoringOptions(bucketed=True, zero_variance_share=quality["zero_variance"]["share"])


def cheapest_lossy(run: ExampleRun, quality: dict) -> tuple[dict | None, list[dict]]:
    """Every combination of lossy options on top of the exact ones; the pick: the fewest lossy options,
    then the best worst-option precision@10%, that gets scoring ≤ ``TARGET_SHARE`` of the stage."""
    base = exact_options(quality)
    combos = []
    for responses, shortlist, last in itertools.product((0, 4), (1.0, *SHORTLIST_FALLBACK), (0, run.layers // 2)):
        opts = replace(base, responses=responses, shortlist=shortlist, last_layers=last)
        live = quality["zero_variance"]["live_share_at_4_responses"] if responses else None
        row = stage_row(run, opts, live_share=live)
        lossy = lossy_quality(opts, quality, run.layers)
        if lossy:
            combos.append({"options": lossy, "scoring_per_stage_h": row["scoring_per_stage_h"],
                           "stage_h": row["stage_h"], "scoring_share": row["scoring_share"]})
    meeting = [c for c in combos if c["scoring_share"] <= TARGET_SHARE]
    pick = min(meeting, key=lambda c: (len(c["options"]), -min(c["options"].values()), c["scoring_share"]),
               default=None)
    return pick, combos


def reproduce_old_table(runs: list[ExampleRun]) -> list[dict]:
    """§3 as first computed by hand: no options, the target sets scored with 16 (1.5B) / 8 (7B) responses."""
    return [stage_row(r, target_samples=SCORED_TARGET_SAMPLES_IN_OLD_TABLE[r.preset]) for r in runs]


def rounded(row: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}


def main() -> dict:
    runs = [read_example(*e) for e in EXAMPLES]
    quality = measured_quality()
    exact = exact_options(quality)
    configs = []
    for run in runs:
        pick, combos = cheapest_lossy(run, quality)
        exact_row = stage_row(run, exact)
        if exact_row["scoring_share"] <= TARGET_SHARE:  # no lossy option needed
            pick = {"options": {}, **{k: exact_row[k] for k in ("scoring_per_stage_h", "stage_h", "scoring_share")}}
        bucketed = stage_row(run, ScoringOptions(bucketed=True))
        configs.append({
            "config": run.label, "nodes": run.nodes, "tp_pp_dp": [run.tp, run.pp, run.dp], "params": run.params,
            "pool_samples": run.pool_samples, "target_samples": run.target_samples, "max_tokens": run.max_tokens,
            "padding": {k: round(v, 3) for k, v in padding_profile(
                prompts=4096, responses=run.pool_samples, prompt_tokens=PROMPT_TOKENS,
                mean_response=MEAN_RESPONSE_TOKENS[run.preset], max_tokens=run.max_tokens, seq=run.seq,
                prompts_per_call=run.scoring_microbatches_per_call).items()},
            "none": rounded(stage_row(run)),
            "bucketed_zero_variance_0": rounded(bucketed),
            "exact": rounded(exact_row),
            "exact_plus_lossy": None if pick is None else {k: (rounded(v) if isinstance(v, dict) else round(v, 3))
                                                           for k, v in pick.items()},
            "lossy_combinations": [{k: (v if isinstance(v, dict) else round(v, 3)) for k, v in c.items()} for c in combos],
        })
    result = {"benchmark": "cost_model", "computed": True, "target_share": TARGET_SHARE,
              "assumptions": {name: value for name, value in globals().items() if name.isupper()
                              and isinstance(value, (int, float, dict)) and not name.startswith("SHORTLIST")},
              "old_table_reproduced": [rounded(r) for r in reproduce_old_table(runs)],
              "cpu_padding_cross_check": cpu_padding_cross_check(), "measured_quality": quality, "configs": configs}
    (RESULTS / "cost_model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({c["config"]: {"share_none": c["none"]["scoring_share"], "share_exact": c["exact"]["scoring_share"],
                                    "share_lossy": c["exact_plus_lossy"] and c["exact_plus_lossy"]["scoring_share"],
                                    "lossy": c["exact_plus_lossy"] and c["exact_plus_lossy"]["options"]}
                      for c in configs}))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
