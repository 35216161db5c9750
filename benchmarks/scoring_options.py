"""Cheaper scoring, measured: length-aware micro-batches, and a parameter subset with a truncated backward.

Three parts, each side by side in one run (one torch thread, warm-up calls first, best of the repeats,
configurations interleaved round by round; ``--quick``: one repeat):

1. **Padding** (``scoring.max_tokens_per_microbatch``). The 3.2M-parameter Qwen2-style GPT of
   ``capture.py`` (4 layers, hidden 256, vocab 512), a synthetic pool of prompts of 16 tokens × K = 8
   responses whose lengths follow a clipped log-normal like RL responses scaled down: ``max_tokens`` 192,
   mean ≈ 24 (1/8 of the maximum), a long tail, a few responses cut at the maximum. Scored through
   ``score_pool`` (batched capture, SJLT k = 4096, keep 0.1) padded to the pool's longest sequence
   (8 prompts per micro-batch, one micro-batch per call: today's behaviour) and with length-aware
   micro-batches (a budget of ``8 × K × s_max`` tokens, the padded run's micro-batch, so at most 8
   prompts per micro-batch as well; lengths rounded up to 8). One micro-batch per call keeps the calls
   as fine-grained as a large pool's would be (a call's length is its longest prompt's). Reported: real
   prompt + response tokens per second, padded positions per second, the padding fraction
   (``1 − real / padded`` positions), and the largest relative difference of the two runs' features.
2. **Subset, time** (``scoring.last_layers`` + ``truncate_backward``): the same model and pool
   (length-aware), all parameters vs the last 2 and the last 1 decoder layers (+ final norm + output
   layer) with the truncated backward, and the last layer without truncation.
3. **Subset, quality and time on the CPU default**: the ``cpu-default`` model (0.38M parameters,
   2 layers) of a finished ``cropi run examples/configs/tiny_cpu.yaml`` (``--run-dir``; its ``warmup/hf``
   if kept, else ``final_hf``) scores that run's stored pool and ``target-*`` rollouts with the run's own
   scoring and projection settings (SJLT k = 8192, keep 0.5): all parameters vs ``last_layers`` 2 and 1
   (truncated). Quality is that of the selection: the cosine of each usable pool prompt with the target
   set's mean feature (``target_direction``, 100 prompts; ``cosine_scores``), subset vs all parameters,
   as precision@10% (overlap of the top 10%) and Spearman rank correlation. Without a run directory, the
   same model with seeded weights on a synthetic pool (``--synthetic``; said in the output).

    python benchmarks/scoring_options.py --quick       # ~3 minutes on the 2-core CPU box

Writes ``benchmarks/results/scoring_options[_quick].json``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
K, PROMPT_LEN, MAX_RESP, MEAN_RESP = 8, 16, 192, 24
RUN_DIRS = (ROOT / "runs" / "tiny_cpu", Path("/tmp/baseline/runs/tiny_cpu"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data and models
def response_lengths(n: int, rng) -> np.ndarray:
    """Clipped log-normal lengths in ``[1, MAX_RESP]`` with mean ≈ ``MEAN_RESP`` (σ = 1: a long tail)."""
    sigma = 1.0
    mu = np.log(MEAN_RESP) - sigma ** 2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, MAX_RESP).astype(int)


def length_pool(n: int, vocab: int, seed: int = 0):
    from megatron_cropi.records import PromptRecord, Response, RolloutGroup

    rng = np.random.default_rng(seed)
    pool = []
    for i in range(n):
        prompt = PromptRecord(f"s{i:05d}", rng.integers(1, vocab, PROMPT_LEN).astype(np.int32), answer="")
        resps = tuple(Response(rng.integers(1, vocab, t).astype(np.int32), (-rng.uniform(2, 6, t)).astype(np.float32))
                      for t in response_lengths(K, rng))
        rewards = rng.integers(0, 2, K).astype(np.float32)
        rewards[0], rewards[1] = 1.0, 0.0  # every prompt has a gradient
        pool.append(RolloutGroup(prompt, resps, rewards))
    return pool


def bench_model(groups, max_seq: int):
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    cfg = tiny_model_config(
        "custom", vocab_size=512, max_sequence_length=max_seq, tie_word_embeddings=False, rotary_base=10000.0,
        transformer=dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                         num_query_groups=2))
    return build_tiny_model(cfg, groups, seed=0, std=0.02), cfg


# ---------------------------------------------------------------- measurement
def score(model, groups, projector, pool, cfg, *, temperature=1.0, k=K):
    from megatron_cropi.influence.scorer import score_pool
    from megatron_cropi.influence.stores import MemoryFeatureSink

    sink = MemoryFeatureSink(len(pool), projector.k)
    t = time.perf_counter()
    stats = score_pool(pool, sink, model=model, groups=groups, projector=projector, cfg=cfg, temperature=temperature,
                       responses_per_prompt=k, progress=False)
    return sink.features, sink.status, stats, time.perf_counter() - t


def interleaved(runs: dict, repeats: int, warmups: dict | None = None) -> dict:
    """``{name: (features, status, stats, best seconds)}`` of ``repeats`` rounds over ``runs``, after one
    call of each ``warmups`` entry (projector index caches, allocator)."""
    for fn in (warmups or {}).values():
        fn()
    out = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            res = fn()
            out[name] = res if name not in out or res[3] < out[name][3] else (*res[:3], out[name][3])
    return out


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    live = np.abs(b).sum(1) > 0
    return float((np.linalg.norm(a[live] - b[live], axis=1) / np.linalg.norm(b[live], axis=1)).max())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def selection_agreement(pool_f, pool_ok, target_f, target_ok, ref_pool_f, ref_target_f) -> dict:
    """Precision@10% and Spearman of subset vs reference cosine-to-target-mean scores (usable prompts)."""
    from megatron_cropi.selection.scores import cosine_scores, target_direction

    d, _ = target_direction(target_f, target_ok, max_prompts=100, seed=0)
    d_ref, _ = target_direction(ref_target_f, target_ok, max_prompts=100, seed=0)
    s, s_ref = cosine_scores(pool_f, pool_ok, d)[pool_ok], cosine_scores(ref_pool_f, pool_ok, d_ref)[pool_ok]
    top = max(1, len(s) // 10)
    hits = len(set(np.argsort(-s)[:top]) & set(np.argsort(-s_ref)[:top]))
    return {"precision_at_10pct": hits / top, "spearman": spearman(s, s_ref), "usable_pool_prompts": int(len(s))}


# ---------------------------------------------------------------- parts
def part_padding(groups, n: int, repeats: int) -> tuple[dict, tuple]:
    from megatron_cropi.influence.scorer import ScoringConfig
    from megatron_cropi.popi.batch import sequence_length_for
    from megatron_cropi.projection.config import build_projector

    model, mcfg = bench_model(groups, PROMPT_LEN + MAX_RESP)
    pool = length_pool(n, mcfg.vocab_size)
    lens = np.array([len(r.token_ids) for g in pool for r in g.responses])
    s_max = sequence_length_for(pool)
    projector = build_projector(kind="sjlt", k=4096, keep_ratio=0.1, seed=0)
    padded = ScoringConfig(prompts_per_microbatch=8, microbatches_per_call=1)
    bucketed = ScoringConfig(prompts_per_microbatch=8, microbatches_per_call=1, max_tokens_per_microbatch=8 * K * s_max,
                             length_multiple=8)
    log(f"[padding] {n} prompts x {K}, responses mean {lens.mean():.1f} (max {lens.max()}), s_max {s_max}")
    cfgs = {"padded": padded, "bucketed": bucketed}
    res = interleaved({k: (lambda c=c: score(model, groups, projector, pool, c)) for k, c in cfgs.items()}, repeats,
                      {k: (lambda c=c: score(model, groups, projector, pool[:8], c)) for k, c in cfgs.items()})
    out = {"pool": {"prompts": n, "responses_per_prompt": K, "prompt_tokens": PROMPT_LEN,
                    "response_mean": float(lens.mean()), "response_median": float(np.median(lens)),
                    "response_p99": float(np.percentile(lens, 99)), "response_max": int(lens.max()),
                    "responses_at_max": float((lens == MAX_RESP).mean()), "s_max": int(s_max)}}
    for name, (_, _, st, sec) in res.items():
        out[name] = {"seconds": sec, "tokens_per_s": st.tokens / sec, "padded_tokens_per_s": st.padded_tokens / sec,
                     "padding_fraction": st.padding_fraction, "tokens": st.tokens, "padded_tokens": st.padded_tokens}
        log(f"  {name}: {sec:.2f} s, {st.tokens / sec:,.0f} real tok/s, padding {st.padding_fraction:.1%}")
    out["speedup"] = res["padded"][3] / res["bucketed"][3]
    out["max_rel_feature_diff"] = rel_diff(res["bucketed"][0], res["padded"][0])
    return out, (model, pool, bucketed)


def part_subset_time(groups, model, pool, base_cfg, repeats: int) -> dict:
    import dataclasses

    from megatron_cropi.projection.config import build_projector

    projector = build_projector(kind="sjlt", k=4096, keep_ratio=0.1, seed=0)
    cfgs = {"all": base_cfg,
            "last2": dataclasses.replace(base_cfg, last_layers=2, truncate_backward=True),
            "last1": dataclasses.replace(base_cfg, last_layers=1, truncate_backward=True),
            "last1_untruncated": dataclasses.replace(base_cfg, last_layers=1)}
    res = interleaved({n: (lambda c=c: score(model, groups, projector, pool, c)) for n, c in cfgs.items()}, repeats,
                      {n: (lambda c=c: score(model, groups, projector, pool[:8], c)) for n, c in cfgs.items()})
    out = {n: {"seconds": r[3], "speedup_vs_all": res["all"][3] / r[3]} for n, r in res.items()}
    out["last1_truncated_vs_untruncated_max_rel_diff"] = rel_diff(res["last1"][0], res["last1_untruncated"][0])
    for n, v in out.items():
        log(f"  [subset 3.2M] {n}: {v}")
    return out


def _run_inputs(run_dir: Path | None, groups):
    """``(model, pool groups, target groups, sampling, scoring cfg, projector, description)``."""
    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.influence.scorer import ScoringConfig
    from megatron_cropi.influence.stores import read_complete_store
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.run_config import RunConfig
    from megatron_cropi.wiring import build_policy_model

    if run_dir is not None:
        cfg = from_dict(RunConfig, json.loads((run_dir / "state.json").read_text())["config"])
        hf = next(p for p in (run_dir / "warmup" / "hf", run_dir / "final_hf") if p.exists())
        model = build_policy_model(cfg, groups, hf_dir=hf)
        pool, sampling = read_complete_store(run_dir / "rollouts" / "pool")
        target_dir = sorted((run_dir / "rollouts").glob("target-*"))[0]
        target, _ = read_complete_store(target_dir)
        desc = f"{hf.relative_to(run_dir.parent)} scoring {run_dir.name}'s stored pool and {target_dir.name}"
        return model, pool, target, sampling.n, sampling.logprob_temperature, cfg.scoring, \
            build_projector(cfg.projection), desc
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    model = build_tiny_model(tiny_model_config("cpu-default"), groups, seed=0, std=0.05)
    pool = length_pool(600, 32, seed=1)
    target = length_pool(100, 32, seed=2)
    import dataclasses

    pool, target = ([dataclasses.replace(g, responses=tuple(dataclasses.replace(r, token_ids=r.token_ids[:8],
                                                                               logprobs=r.logprobs[:8])
                                                            for r in g.responses)) for g in part]
                    for part in (pool, target))  # cpu-default has 32 positions
    return model, pool, target, K, 1.0, ScoringConfig(prompts_per_microbatch=64, microbatches_per_call=4), \
        build_projector(kind="sjlt", k=8192, keep_ratio=0.5, seed=0), "synthetic: seeded cpu-default, random rollouts"


def part_subset_quality(groups, run_dir: Path | None, repeats: int) -> dict:
    import dataclasses

    from megatron_cropi.influence.feature_store import DONE

    model, pool, target, k, temp, base, projector, desc = _run_inputs(run_dir, groups)
    log(f"[subset quality] {desc}: {len(pool)} pool, {len(target)} target prompts")
    cfgs = {"all": base, "last2": dataclasses.replace(base, last_layers=2, truncate_backward=True),
            "last1": dataclasses.replace(base, last_layers=1, truncate_backward=True)}
    targets = {n: score(model, groups, projector, target, c, temperature=temp, k=k) for n, c in cfgs.items()}  # warm
    res = interleaved({n: (lambda c=c: score(model, groups, projector, pool, c, temperature=temp, k=k))
                       for n, c in cfgs.items()}, repeats)
    pool_ok, target_ok = res["all"][1] == DONE, targets["all"][1] == DONE
    out = {"source": desc, "pool_prompts": len(pool), "target_prompts": len(target)}
    from megatron_cropi.influence.scorer import scored_layouts

    for name, (pf, _, st, sec) in res.items():
        n_params = sum(int(np.prod(l.global_shape)) for l in scored_layouts(model, groups, cfgs[name]).values())
        entry = {"pool_seconds": sec, "seconds_per_prompt": sec / max(st.scored, 1),
                 "speedup_vs_all": res["all"][3] / sec, "scored_parameters": n_params}
        if name != "all":
            entry.update(selection_agreement(pf, pool_ok, targets[name][0], target_ok, res["all"][0],
                                             targets["all"][0]))
        out[name] = entry
        log(f"  {name}: {entry}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run-dir", type=Path, default=None, help="a finished tiny_cpu run (default: runs/tiny_cpu or "
                                                               "/tmp/baseline/runs/tiny_cpu when present)")
    ap.add_argument("--synthetic", action="store_true", help="part 3 without a run directory")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_cropi.parallel import build_parallel_groups, init_distributed

    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    run_dir = None if args.synthetic else (args.run_dir or next((d for d in RUN_DIRS if (d / "state.json").exists()),
                                                                 None))
    n, repeats = (32, 1) if args.quick else (128, 3)
    t0 = time.perf_counter()
    padding, (model, pool, bucketed) = part_padding(groups, n, repeats)
    subset_time = part_subset_time(groups, model, pool, bucketed, repeats)
    quality = part_subset_quality(groups, run_dir, repeats)
    summary = {
        "benchmark": "scoring_options", "quick": args.quick, "torch_threads": 1,
        "padding": padding, "subset_time_3p2m": subset_time, "subset_cpu_default": quality,
        "headline": {
            "bucketed_speedup": round(padding["speedup"], 2),
            "tokens_per_s_padded": round(padding["padded"]["tokens_per_s"]),
            "tokens_per_s_bucketed": round(padding["bucketed"]["tokens_per_s"]),
            "padding_fraction_padded": round(padding["padded"]["padding_fraction"], 3),
            "padding_fraction_bucketed": round(padding["bucketed"]["padding_fraction"], 3),
            "bucketed_max_rel_feature_diff": padding["max_rel_feature_diff"],
            "last2_speedup_3p2m": round(subset_time["last2"]["speedup_vs_all"], 2),
            "last1_speedup_3p2m": round(subset_time["last1"]["speedup_vs_all"], 2),
            "last1_untruncated_speedup_3p2m": round(subset_time["last1_untruncated"]["speedup_vs_all"], 2),
            "cpu_default_last2_speedup": round(quality["last2"]["speedup_vs_all"], 2),
            "cpu_default_last1_speedup": round(quality["last1"]["speedup_vs_all"], 2),
            "cpu_default_last2_precision_at_10pct": round(quality["last2"]["precision_at_10pct"], 3),
            "cpu_default_last2_spearman": round(quality["last2"]["spearman"], 3),
            "cpu_default_last1_precision_at_10pct": round(quality["last1"]["precision_at_10pct"], 3),
            "cpu_default_last1_spearman": round(quality["last1"]["spearman"], 3),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = args.out or RESULTS / f"scoring_options{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(json.dumps(summary, default=float))
    return summary


if __name__ == "__main__":
    main()
