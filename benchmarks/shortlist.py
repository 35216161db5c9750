"""What the pool shortlist (``scoring.shortlist``) costs in selection quality, measured on finished runs.

Input: run directories of ``cropi run`` that kept every stage's feature stores (``curriculum.keep_features:
all``, the default; e.g. the ``cropi-s*`` runs of ``benchmarks/curriculum.py``). Every stage there was
scored in full, so for each stage m ≥ 1 both selections can be formed at the same checkpoint θ_m:

* full: the top ``ratio`` of the pool by influence score at θ_m over every live prompt (what the run did);
* shortlisted: the same, over the rows :func:`~megatron_cropi.influence.shortlist.shortlist_mask` would
  have scored, given the ranking carried from stages < m *as a shortlisted run would have carried it*
  (each earlier stage contributes only its own shortlisted rows' scores).

Reported per shortlist fraction, over every stage ≥ 1 of every run: precision@10% (overlap of the two
selections ÷ budget, mean and min) and the share of live pool prompts scored (the cost; stage 0 and
``full_every`` stages score everything). One JSON line; the full result to
``benchmarks/results/shortlist.json``.

    python benchmarks/shortlist.py RUN_DIR [RUN_DIR ...] [--fractions 0.2,0.3,0.5] [--explore 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stage_scores(run: Path, m: int, cfg):
    """``(prompt ids, live [N], scores [N], pass rates [N])`` of stage ``m``: influence scores at θ_m over
    every live row, and the behaviour pass rates of the store it scored."""
    from megatron_cropi.curriculum.steps import selection_inputs
    from megatron_cropi.selection.policies import ranking_scores

    features = {p.name: p for p in (run / "features" / f"stage{m}").iterdir() if p.is_dir()}
    refreshed = [int(p.name[5:]) for p in (run / "rollouts").glob("stage*") if int(p.name[5:]) <= m]
    store = run / "rollouts" / (f"stage{max(refreshed)}" if refreshed else "") / "pool"
    inputs = selection_inputs([], pool_rollouts=store, features=features, previous=set())
    return (list(inputs.prompt_ids), np.asarray(inputs.usable, bool), ranking_scores(cfg, inputs, seed=cfg_seed(run)),
            np.asarray(inputs.pass_rates, np.float64))


def cfg_seed(run: Path) -> int:
    import yaml

    return int(yaml.safe_load((run / "config.yaml").read_text())["run"]["seed"]) if (run / "config.yaml").exists() \
        else int(json.loads((run / "state.json").read_text())["config"]["run"]["seed"])


def top(scores: np.ndarray, rows: np.ndarray, budget: int) -> set[int]:
    rows = rows[np.isfinite(scores[rows])]
    return set(rows[np.argsort(-scores[rows], kind="stable")][:budget].tolist())


def measure(run: Path, fraction: float, explore: float, ratio: float, signal: str) -> list[dict]:
    from megatron_cropi.influence.shortlist import ShortlistConfig, carry_ranking, shortlist_mask
    from megatron_cropi.selection.policies import SelectionConfig

    sel_cfg = SelectionConfig(ratio=ratio)
    short = ShortlistConfig(fraction=fraction, explore=explore)
    stages = sorted(int(p.name[5:]) for p in (run / "features").glob("stage*"))
    carried, out = None, []
    for m in stages:
        ids, live, scores, pass_rates = stage_scores(run, m, sel_cfg)
        budget = int(ratio * len(ids))
        if signal == "learnability":  # a static cheap signal instead of the carried influence ranking
            carried = {i: float(p * (1 - p)) for i, p in zip(ids, pass_rates)}
        mask = shortlist_mask(short, m, ids, live, carried, min_rows=budget, seed=cfg_seed(run))
        if m > 0:
            full, picked = top(scores, np.flatnonzero(live), budget), top(scores, np.flatnonzero(mask), budget)
            out.append({"run": run.name, "stage": m, "precision_at_10pct": len(full & picked) / max(len(full), 1),
                        "scored_share": float(mask.sum() / max(live.sum(), 1)), "live": int(live.sum()),
                        "budget": budget})
        carried = carry_ranking(carried, ids, scores, mask & live)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--fractions", default="0.2,0.3,0.5,0.7")
    ap.add_argument("--explore", type=float, default=0.1)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--signal", choices=["rank", "learnability"], default="rank",
                    help="what the shortlist ranks by: the carried influence ranking (scoring.shortlist), or "
                         "β's learnability p(1-p) (a static signal, for comparison)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/shortlist.json")
    args = ap.parse_args()
    result = {"runs": [str(r) for r in args.runs], "explore": args.explore, "ratio": args.ratio, "signal": args.signal,
              "by_fraction": {}}
    for fraction in (float(f) for f in args.fractions.split(",")):
        rows = [r for run in args.runs for r in measure(run, fraction, args.explore, args.ratio, args.signal)]
        prec = [r["precision_at_10pct"] for r in rows]
        share = [r["scored_share"] for r in rows]
        result["by_fraction"][str(fraction)] = {
            "precision_at_10pct_mean": float(np.mean(prec)), "precision_at_10pct_min": float(np.min(prec)),
            "scored_share_of_live_after_stage0": float(np.mean(share)), "stages": len(rows), "per_stage": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({f: {k: v for k, v in d.items() if k != "per_stage"} for f, d in result["by_fraction"].items()}))


if __name__ == "__main__":
    main()
