"""What scoring on fewer responses than were rolled out costs in selection quality, and saves in time.

``scoring.max_responses_per_prompt: K'`` scores each prompt on its first K' stored responses. On a
finished CPU-default run (its warm-up policy β, its stored pool and target rollouts, its projector),
this scores the pool and the target set at β with every response and with fewer, side by side in one
process, and compares the CROPI selections: precision@10% (overlap of the top-10% pool prompts by
cosine to the target direction) and Spearman of the cosines, against all responses; plus the scoring
time of each setting and how many prompts keep a gradient.

    python benchmarks/response_subsample.py --run runs/tiny_cpu       # after `cropi run tiny_cpu.yaml`

Prints one JSON line; writes ``benchmarks/results/response_subsample.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs/tiny_cpu"), help="a finished `cropi run` of tiny_cpu.yaml")
    ap.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    ap.add_argument("--pool", default="0,4", help="K' for the pool (0 = all)")
    ap.add_argument("--target", default="0,16,8", help="K' for the target set (0 = all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/response_subsample.json"))
    args = ap.parse_args()

    import torch

    from megatron_cropi.influence.feature_store import DONE
    from megatron_cropi.influence.stores import MemoryFeatureSink, PolicyScorer, read_complete_store, score_store
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.run_config import load_run_config
    from megatron_cropi.selection.scores import cosine_scores, target_direction
    from megatron_cropi.wiring import build_policy_model, pad_id_of, setup_run

    torch.manual_seed(0)
    cfg = load_run_config(args.config)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, num_threads=1))
    layout = RunLayout(args.run)
    groups, prompts, tokenizer = setup_run(cfg)
    model = build_policy_model(cfg, groups, hf_dir=layout.warmup_hf)
    projector = build_projector(cfg.projection)
    target_name = f"target-{prompts.target_family}"

    def features(name: str, cap: int):
        n = len(read_complete_store(layout.rollouts(name))[0])
        scoring = dataclasses.replace(cfg.scoring, max_responses_per_prompt=cap)
        scorer = PolicyScorer(model, groups, projector, scoring, projection_seed=cfg.projection.seed,
                              checkpoint_step=0, pad_id=pad_id_of(tokenizer))
        sink = MemoryFeatureSink(n, projector.k)
        t0 = time.perf_counter()
        score_store(layout.rollouts(name), sink, scorer)
        usable = (sink.status == DONE) & (np.abs(sink.features).sum(1) > 0)
        return sink.features, usable, time.perf_counter() - t0

    pool = {int(c): features("pool", int(c)) for c in args.pool.split(",")}
    target = {int(c): features(target_name, int(c)) for c in args.target.split(",")}

    def scores(pk: int, tk: int) -> np.ndarray:
        pf, pu, _ = pool[pk]
        tf, tu, _ = target[tk]
        direction, _ = target_direction(tf, tu, max_prompts=cfg.selection.max_target_prompts, seed=cfg.run.seed)
        return cosine_scores(pf, pu, direction)

    ref = scores(0, 0)
    ok = np.isfinite(ref)
    top = max(1, int(round(cfg.selection.ratio * ok.sum())))
    best_ref = set(np.argsort(-np.where(ok, ref, -np.inf))[:top])
    rows = []
    for pk in pool:
        for tk in target:
            s = scores(pk, tk)
            both = ok & np.isfinite(s)
            best = set(np.argsort(-np.where(np.isfinite(s), s, -np.inf))[:top])
            ra = np.argsort(np.argsort(ref[both]))
            rb = np.argsort(np.argsort(s[both]))
            rows.append({"pool_responses": pk or "all", "target_responses": tk or "all",
                         "precision_at_10pct": len(best & best_ref) / top,
                         "spearman": float(np.corrcoef(ra, rb)[0, 1]),
                         "pool_prompts_with_gradient": int(pool[pk][1].sum()),
                         "target_prompts_with_gradient": int(target[tk][1].sum()),
                         "scoring_seconds": round(pool[pk][2] + target[tk][2], 2)})
    result = {"benchmark": "response_subsample", "run": str(layout.root), "policy": "warm-up β (stage 0)",
              "top_m": top, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
