"""GPU time of one CROPI curriculum stage at scale, computed (``docs/at_scale.md`` §3).

Pure arithmetic on the example configs (read with :func:`megatron_cropi.run_config.load_run_config`;
model sizes from :mod:`megatron_cropi.memory`) and the throughput assumptions of :mod:`megatron_cropi.cost`
(the arithmetic itself lives there; ``cropi run --dry-run`` prints it for any config). Nothing here runs
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
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from megatron_cropi import cost  # noqa: E402  (the arithmetic; this file adds the examples and measured quality)
from megatron_cropi.cost import (  # noqa: E402,F401  (re-exported: tests and at_scale.md name them here)
    DECODE_STEP_S, GPUS_PER_NODE, LENGTH_SEED, MEAN_RESPONSE_TOKENS, PROMPT_TOKENS, RESPONSE_LENGTH_SIGMA,
    VLLM_TOKENS_PER_S, ScoringOptions, behaviour_seconds, bucketed_row_lengths, cluster_flops, grpo_step_seconds,
    padding_profile, pipeline_bubble, sampled_response_lengths, scored_prompts, scoring_flops_per_row,
    scoring_seconds, shape_from_config, stage_row)
from megatron_cropi.cost import StageShape as ExampleRun  # noqa: E402
from megatron_cropi.cost_scale_out import scale_out_footprint  # noqa: E402

# ------------------------------------------------------------------ assumptions (§3), each a constant
POOL_PROMPTS = 7_473 + 7_500 + 40_315   # GSM8K-train + MATH-train + DeepScaleR = 55,288
TARGET_PROMPTS = 1_000                  # target prompts scored every stage
SCORED_TARGET_SAMPLES_IN_OLD_TABLE = {"qwen2.5-1.5b": 16, "qwen2.5-7b": 8}   # what §3 was first computed with
TARGET_SHARE = 0.15                     # the issue's bar: scoring ≤ 15% of a stage's GPU time

EXAMPLES = (  # (label, config file, nodes): DP comes from the launch's world size, not from the file
    ("1.5B, 1 node", "qwen2.5-1.5b-instruct_1node.yaml", 1),
    ("1.5B, 2 nodes", "qwen2.5-1.5b-instruct_2node.yaml", 2),
    ("7B, 1 node", "qwen2.5-7b-instruct_1node.yaml", 1),
    ("7B, 2 nodes", "qwen2.5-7b-instruct_2node.yaml", 2),
    ("7B, 4 nodes", "qwen2.5-7b-instruct_4node.yaml", 4),
)


def read_example(label: str, filename: str, nodes: int) -> ExampleRun:
    """One example config through the project's loader (placeholders filled with dummy paths)."""
    from megatron_cropi.run_config import load_run_config

    cfg = load_run_config(ROOT / "examples" / "configs" / filename, environ={"DATA_DIR": "/data", "MODEL_DIR": "/model"})
    return shape_from_config(cfg, world_size=nodes * GPUS_PER_NODE, pool_prompts=POOL_PROMPTS,
                             target_prompts=TARGET_PROMPTS, label=label, nodes=nodes)


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
    if shortlist_path.exists():  # benchmarks/shortlist.py's result: {"by_fraction": {"0.5": {...mean...}}}
        measured = json.loads(shortlist_path.read_text())["by_fraction"]
        shortlist = {"precision_at_10pct": {f: d["precision_at_10pct_mean"] for f, d in measured.items()}}
        source = f"benchmarks/results/shortlist.json ({sum(d['stages'] for d in measured.values()) // len(measured)} stages)"
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
    return [stage_row(replace(r, grpo_length_aware=False), target_samples=SCORED_TARGET_SAMPLES_IN_OLD_TABLE[r.preset])
            for r in runs]


def scale_out_example() -> dict:
    """Scoring a 1M-prompt pool on 128 nodes (1,024 GPUs) with the 7B layout (TP4×PP2, DP 128), k = 32768
    stored as float16, 8 responses of the 7B mean length; 43% of prompts live (the CPU default's share)."""
    return scale_out_footprint(pool_prompts=1_000_000, nodes=128, tp=4, pp=2, k=32768, feature_bytes=2,
                                    responses=8, mean_response_tokens=MEAN_RESPONSE_TOKENS["qwen2.5-7b"],
                                    prompt_tokens=PROMPT_TOKENS, live_fraction=0.43, prompts_per_unit=32)


def rounded(row: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else rounded(v) if isinstance(v, dict) else v) for k, v in row.items()}


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
            "none": rounded(stage_row(replace(run, grpo_length_aware=False))),
            "grpo_training_row": {"padded": run.seq, "mean_padded_length": round(cost.grpo_row_lengths(run)[0], 1),
                                  "length_aware": run.grpo_length_aware and run.pp == 1},
            "bucketed_zero_variance_0": rounded(bucketed),
            "exact": rounded(exact_row),
            "exact_plus_lossy": None if pick is None else {k: (rounded(v) if isinstance(v, dict) else round(v, 3))
                                                           for k, v in pick.items()},
            "lossy_combinations": [{k: (v if isinstance(v, dict) else round(v, 3)) for k, v in c.items()} for c in combos],
        })
    result = {"benchmark": "cost_model", "computed": True, "target_share": TARGET_SHARE,
              "assumptions": {name: value for name, value in {**vars(cost), **globals()}.items() if name.isupper()
                              and isinstance(value, (int, float, dict)) and not name.startswith("SHORTLIST")
                              and name not in ("ANCHOR_PARAMS", "MEAN_RESPONSE_SHARE") and "BYTES" not in name},
              "old_table_reproduced": [rounded(r) for r in reproduce_old_table(runs)],
              "cpu_padding_cross_check": cpu_padding_cross_check(), "measured_quality": quality, "configs": configs,
              "scale_out_1m_prompts_128_nodes": scale_out_example()}
    (RESULTS / "cost_model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({c["config"]: {"share_none": c["none"]["scoring_share"], "share_exact": c["exact"]["scoring_share"],
                                    "share_lossy": c["exact_plus_lossy"] and c["exact_plus_lossy"]["scoring_share"],
                                    "lossy": c["exact_plus_lossy"] and c["exact_plus_lossy"]["options"]}
                      for c in configs}))
    return result


if __name__ == "__main__":
    main()
