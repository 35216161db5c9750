"""CROPI vs full-data GRPO vs random-10% vs learnability on the synthetic suite, equal GRPO steps.

One supervised warm-up gives the shared behaviour policy β (its HF export); every method then runs
the same number of GRPO steps from it, for each seed (seeds vary sampling and batching). Reported:

* step-level acceleration: steps full-data GRPO needs to reach its final target accuracy (mean of its
  last two evaluations) over the steps CROPI needs to reach the same, per seed, with the spread;
* wall-clock acceleration, the same on the run clock, which charges CROPI its behaviour rollouts,
  scoring and selection (evaluation time is charged to no method);
* every method's untargeted (check-set) accuracy, and CROPI's minus full-data's in points.

Target accuracy is the sampled pass rate (mean over 4 samples at T = 1) on the held-out target test
set; greedy accuracy is reported beside it.

    python benchmarks/curriculum.py --quick      # 3 seeds, shorter stages
    python benchmarks/curriculum.py              # 3 seeds × 6 stages × 50 steps (the calibration's)

The last line printed is a JSON object with ``step_acceleration``, ``wallclock_acceleration``,
``untargeted_delta_pts`` and ``seeds``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cropi", "full", "random", "learnability")


def base_config(args) -> dict:
    cfg = yaml.safe_load((ROOT / "examples/configs/tiny_cpu.yaml").read_text())
    cfg["run"]["num_threads"] = 1
    cfg["rollout"]["progress"] = False
    cfg["curriculum"]["stages"] = args.stages
    cfg["curriculum"]["steps_per_stage"] = args.steps_per_stage
    cfg["curriculum"]["eval"]["every"] = args.eval_every
    cfg["curriculum"]["probe_prompts"] = 0
    cfg["curriculum"]["plot"] = False
    return cfg


def run_cli(cfg: dict, out: Path, log: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "megatron_cropi.cli", "run", str(path)], stdout=f,
                            stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"cropi run failed ({rc}); see {log}")
    return time.perf_counter() - t0


def eval_records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics" / "eval.jsonl").read_text().splitlines() if x]


def first_reaching(records: list[dict], key: str, threshold: float, axis: str) -> float | None:
    for r in records:
        if r.get(key, -1) >= threshold - 1e-12:
            return float(r[axis])
    return None


def acceleration(full: list[dict], method: list[dict], axis: str, key: str = "target_sampled") -> dict:
    """Steps (or clock seconds) full-data GRPO needs to reach its final accuracy, over the method's."""
    threshold = float(np.mean([r[key] for r in full[-2:]]))
    t_full = first_reaching(full, key, threshold, axis)
    t_m = first_reaching(method, key, threshold, axis)
    ratio = (t_full / t_m) if (t_full is not None and t_m) else (float("inf") if t_m == 0 else None)
    return {"threshold": threshold, "full": t_full, "method": t_m, "acceleration": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--stages", type=int, default=None)
    ap.add_argument("--steps-per-stage", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/curriculum"))
    args = ap.parse_args()
    args.stages = args.stages or (4 if args.quick else 6)
    args.steps_per_stage = args.steps_per_stage or (25 if args.quick else 50)
    args.eval_every = args.eval_every or 25
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg0 = base_config(args)

    # 1. the shared behaviour policy: warm-up only (zero stages of training)
    warm = json.loads(json.dumps(cfg0))
    warm["run"]["output_dir"] = str(out / "warmup")
    warm["selection"]["policy"] = "full"
    warm["curriculum"]["stages"] = 1
    warm["curriculum"]["steps_per_stage"] = 0
    t_warm = run_cli(warm, out / "warmup", out / "warmup.log")
    beta = out / "warmup" / "warmup" / "hf"

    # 2. every method × seed from β
    jobs = []
    for seed in range(args.seeds):
        for method in METHODS:
            cfg = json.loads(json.dumps(cfg0))
            cfg["run"]["seed"] = 1000 + seed
            cfg["run"]["output_dir"] = str(out / f"{method}-s{seed}")
            cfg["selection"]["policy"] = method
            cfg["curriculum"]["warmup"]["enabled"] = False
            cfg["rollout"]["checkpoint"] = str(beta)
            jobs.append((method, seed, cfg))
    walls = {}
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_cli, cfg, Path(cfg["run"]["output_dir"]),
                               Path(cfg["run"]["output_dir"] + ".log")): (m, s) for m, s, cfg in jobs}
        for fut, key in futures.items():
            walls[key] = fut.result()

    runs = {(m, s): eval_records(out / f"{m}-s{s}") for m in METHODS for s in range(args.seeds)}
    per_seed = []
    for s in range(args.seeds):
        full = runs[("full", s)]
        entry = {"seed": s}
        for m in ("cropi", "learnability", "random"):
            entry[m] = {"steps": acceleration(full, runs[(m, s)], "step"),
                        "clock": acceleration(full, runs[(m, s)], "clock_seconds")}
        per_seed.append(entry)

    def stat(values):
        vals = [v for v in values if v is not None and np.isfinite(v)]
        return {"mean": float(np.mean(vals)) if vals else None, "min": float(min(vals)) if vals else None,
                "max": float(max(vals)) if vals else None, "n": len(vals), "per_seed": values}

    final = {m: {k: float(np.mean([runs[(m, s)][-1].get(k, np.nan) for s in range(args.seeds)]))
                 for k in ("target_sampled", "target_greedy", "check_greedy")} for m in METHODS}
    initial = runs[("full", 0)][0]
    result = {
        "seeds": args.seeds, "stages": args.stages, "steps_per_stage": args.steps_per_stage,
        "warmup_seconds": t_warm,
        "initial": {k: initial.get(k) for k in ("target_sampled", "target_greedy", "check_greedy")},
        "final_mean": final,
        "step_acceleration_by_method": {m: stat([e[m]["steps"]["acceleration"] for e in per_seed])
                                        for m in ("cropi", "learnability", "random")},
        "wallclock_acceleration_by_method": {m: stat([e[m]["clock"]["acceleration"] for e in per_seed])
                                             for m in ("cropi", "learnability", "random")},
        "clock_seconds_final_mean": {m: float(np.mean([runs[(m, s)][-1]["clock_seconds"] for s in range(args.seeds)]))
                                     for m in METHODS},
        "per_seed": per_seed,
    }
    result["step_acceleration"] = result["step_acceleration_by_method"]["cropi"]["mean"]
    result["wallclock_acceleration"] = result["wallclock_acceleration_by_method"]["cropi"]["mean"]
    result["untargeted_delta_pts"] = 100.0 * (final["cropi"]["check_greedy"] - final["full"]["check_greedy"])
    plot(runs, args, out / "curriculum.png")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("step_acceleration", "wallclock_acceleration", "untargeted_delta_pts",
                                             "seeds", "final_mean")}))


def plot(runs, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m, color in zip(METHODS, ("C3", "C0", "C7", "C2")):
        for ax, key, axis in ((axes[0], "target_sampled", "step"), (axes[1], "target_sampled", "clock_seconds"),
                              (axes[2], "check_greedy", "step")):
            curves = [runs[(m, s)] for s in range(args.seeds)]
            xs = np.array([[r[axis] for r in c] for c in curves], dtype=float)
            ys = np.array([[r.get(key, np.nan) for r in c] for c in curves], dtype=float)
            ax.plot(xs.mean(0), ys.mean(0), "-o", color=color, label=m, markersize=3)
            ax.fill_between(xs.mean(0), ys.min(0), ys.max(0), color=color, alpha=0.15)
    axes[0].set(xlabel="GRPO step", ylabel="target accuracy (sampled, T=1)", title="target vs step")
    axes[1].set(xlabel="run clock (s): rollouts + scoring + selection + training", title="target vs wall-clock")
    axes[2].set(xlabel="GRPO step", ylabel="untargeted check accuracy (greedy)", title="untargeted families")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
