"""CROPI against full-data GRPO and four data-selection baselines on the synthetic suite, equal GRPO steps.

One supervised warm-up (on the chosen target family's sets) gives the shared behaviour policy β (its
HF export). Then every method runs the same number of GRPO steps from β, once per seed. Seeds change
sampling and batching. All methods use the same engine, batch size, learning rate, GRPO settings and
evaluation. A method differs only by the config overrides in ``METHODS``:

* ``cropi``: POPI-gradient alignment with the target set, 10% of the pool per stage;
* ``full``: the whole pool (full-data GRPO, the reference);
* ``random``: a random 10% per stage;
* ``learnability``: the 10% with the highest learnability p(1-p) under β's offline pass rates. The
  rates are fixed, so the selection is the same in every stage;
* ``online_learnability``: learnability from the current policy's pass rates (``selection.policy:
  online_learnability``);
* ``dynamic_sampling``: the whole pool, with DAPO-style dynamic sampling that drops groups whose rewards
  are all equal (``grpo.dynamic_sampling.enabled``);
* ``cropi_dynamic``: CROPI's selection, trained with dynamic sampling (the two compose: CROPI chooses
  the stage's prompts, dynamic sampling drops the zero-variance groups among them). A CROPI variant,
  never a baseline; ``--headline cropi_dynamic`` makes it the method the last line reports;
* ``cropi_guard``: CROPI with the pool as guard set (``selection.guard.source: pool``): prompts whose
  gradient conflicts with the pool's mean gradient are dropped. A CROPI variant;
* ``cropi_refresh``: CROPI with the behaviour sets rolled out again at the current checkpoint every 2
  stages (``curriculum.refresh_behaviour_every: 2``; the refresh is charged to the clock). A CROPI variant;
* ``cropi_first1_r10_dynamic_bg``: the CPU default's warm start with ``curriculum.background_scoring``: stage
  0 trains on the whole pool while a second process scores and selects at β, then on the top 10%. The run
  occupies two cores (trainer and scorer); a run of any method never shares a core with another (the
  runs take cores in order). The scorer's time is not on its clock; ``background_seconds_final`` reports it;
* ``cropi_first1_r10_dynamic_last1_bg``: the same with the last layer scored (``scoring.last_layers: 1``,
  ``scoring.truncate_backward``): a faster, lossy scorer, so the selection arrives earlier. Two cores, as above;
* ``cropi_first2_hold_r10_dynamic_bg``: the warm start in the background with its selection held for stage 1
  too (``curriculum.selected_stages: 2``, ``curriculum.select_every: 2``): one scoring, at β, off the critical
  path; the selection trains from its arrival in stage 0 to the end of stage 1. Two cores, as above;
* ``cropi_r10_dynamic_bg``: the same at every stage: each stage starts on the whole pool and switches to its
  own top 10% (ranked at θ_m from β's rollouts) when the scorer is done. Two cores, as above;
* ``cropi_r30``: CROPI selecting 30% of the pool per stage (``selection.ratio: 0.3``). At 10% a stage of
  50 steps × 32 prompts visits each of the 199 selected prompts 8 times; at 30%, 2.7 times, close to the
  example configs' 2.3 (100 steps × 128 prompts over 10% of a 55k pool). A CROPI variant.

Accuracy is evaluated every ``--eval-every`` GRPO steps, and at step 0 and at the end. ``target_sampled``
is the sampled pass rate (4 samples at T = 1) on the held-out target test set and is the headline
metric. Greedy target accuracy and greedy accuracy on the untargeted check set (every other family)
are also recorded. ``--eval-max-prompts`` caps the prompts per set, with the same cap for every method.

What is measured, per seed s, and then as a mean with a 95% Student-t interval over seeds
(mean ± t_{0.975, n-1} · sd / √n, over the seeds that have a value):

* threshold(s): full-data GRPO's final target accuracy, the mean of its last two evaluations;
* step acceleration: the first evaluated step at which full reaches the threshold, divided by the
  first evaluated step at which the method reaches it;
* wall-clock acceleration: the same ratio on the run clock (``clock_seconds`` in each record of
  ``metrics/eval.jsonl``). The clock charges every method its own work: behaviour rollouts, scoring,
  selection, probes and training. Evaluation is charged to no method;
* ``wallclock_vs_best_baseline``: the best baseline is the non-CROPI method with the highest final
  target accuracy, averaged over seeds. The figure is that baseline's run-clock time to reach its own
  final accuracy, divided by CROPI's run-clock time to reach the same accuracy; it is formed per seed;
* ``untargeted_delta_pts``: 100 × (the method's final check-set greedy accuracy − full's);
* ``compute_acceleration``: the wall-clock ratio on the run clock plus a background scorer's seconds so
  far (``curriculum.background_scoring``), i.e. core-seconds of method work; equal to the wall-clock ratio
  for every method without a background scorer.

A method that never reaches the threshold in a seed gets no ratio for that seed. Those seeds are
counted under ``not_reached``, not dropped silently. A method whose run fails (for example, a config
key the package does not accept yet) is reported under ``failed``, with its log path. The other
methods still run.

    python benchmarks/curriculum.py --quick                     # 2 seeds × 4 stages × 25 steps
    python benchmarks/curriculum.py                             # 5 seeds × 6 stages × 50 steps, target add3c
    python benchmarks/curriculum.py --target sub3 --methods cropi,full,random

By default it runs ``full``, ``random``, ``learnability``, ``online_learnability``, ``dynamic_sampling``,
``cropi`` (the paper's setting) and ``cropi_first1_r10_dynamic`` (the CPU default's setting, a warm start),
and the last line reports the latter (``--headline`` picks another CROPI variant).

Results go to ``benchmarks/results/curriculum/<target>/`` (``--out`` overrides this): ``result.json``
(every method, every seed, the intervals), ``curriculum.png``, and one run directory and log per
method and seed. Rerunning the same command into the same folder resumes unfinished runs (``cropi
run`` refuses to resume a run whose resolved config has changed, e.g. after new config defaults: then
use a fresh ``--out``). The last line printed is one JSON object with CROPI's figures (means): ``step_acceleration``, ``wallclock_acceleration``,
``wallclock_vs_best_baseline``, ``untargeted_delta_pts``, ``seeds`` and ``target``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# method name -> config overrides (dotted key -> value), applied on top of the shared base config
METHODS: dict[str, dict] = {
    "cropi": {"selection.policy": "cropi"},
    "full": {"selection.policy": "full"},
    "random": {"selection.policy": "random"},
    "learnability": {"selection.policy": "learnability"},
    "online_learnability": {"selection.policy": "online_learnability"},
    "dynamic_sampling": {"selection.policy": "full", "grpo.dynamic_sampling": {"enabled": True}},
    "cropi_dynamic": {"selection.policy": "cropi", "grpo.dynamic_sampling": {"enabled": True}},
    "cropi_guard": {"selection.policy": "cropi", "selection.guard": {"source": "pool"}},
    "cropi_refresh": {"selection.policy": "cropi", "curriculum.refresh_behaviour_every": 2},
    "cropi_r30": {"selection.policy": "cropi", "selection.ratio": 0.3},
    # the better-aligned half of the pool, refilled as dynamic sampling does: breadth kept, the conflicting half out
    "cropi_r50_dynamic": {"selection.policy": "cropi", "selection.ratio": 0.5,
                          "grpo.dynamic_sampling": {"enabled": True}},
    # on-policy every stage: the pool and target re-rolled at θ_m, so mastered prompts leave the selection
    "cropi_refresh1": {"selection.policy": "cropi", "curriculum.refresh_behaviour_every": 1},
    "cropi_refresh1_r30_dynamic": {"selection.policy": "cropi", "curriculum.refresh_behaviour_every": 1,
                                   "selection.ratio": 0.3, "grpo.dynamic_sampling": {"enabled": True}},
    # the same at 10% of the pool: below the live set at every stage (398-870 prompts with reward variance), so the
    # influence ranking still chooses which live prompts train
    "cropi_refresh1_r10_dynamic": {"selection.policy": "cropi", "curriculum.refresh_behaviour_every": 1,
                                   "selection.ratio": 0.1, "grpo.dynamic_sampling": {"enabled": True}},
    # the same with the cheaper, lossy scoring of the last layer only (truncated backward; precision@10% 0.58)
    "cropi_refresh1_r10_dynamic_last1": {"selection.policy": "cropi", "curriculum.refresh_behaviour_every": 1,
                                         "selection.ratio": 0.1, "grpo.dynamic_sampling": {"enabled": True},
                                         "scoring.last_layers": 1, "scoring.truncate_backward": True},
    # a warm start: the influence ranking picks 10% of the pool for the first stage only (where it gains the most
    # steps: sub3 0.25 at step 40 against dynamic sampling's 0.20), then the whole pool with dynamic sampling
    "cropi_first1_r10_dynamic": {"selection.policy": "cropi", "selection.ratio": 0.1,
                                 "grpo.dynamic_sampling": {"enabled": True}, "curriculum.selected_stages": 1},
    # the warm start with the last layer scored (truncated backward): stage 0's scoring at a fraction of the cost
    "cropi_first1_r10_dynamic_last1": {"selection.policy": "cropi", "selection.ratio": 0.1,
                                       "grpo.dynamic_sampling": {"enabled": True}, "curriculum.selected_stages": 1,
                                       "scoring.last_layers": 1, "scoring.truncate_backward": True},
    # the warm start with its scoring off the critical path: stage 0 trains on the whole pool (dynamic sampling)
    # while a second process scores and selects at β, and switches to the top 10% when they are done; the run
    # gets two cores (its trainer's and its scorer's), every other run one
    "cropi_first1_r10_dynamic_bg": {"selection.policy": "cropi", "selection.ratio": 0.1,
                                    "grpo.dynamic_sampling": {"enabled": True}, "curriculum.selected_stages": 1,
                                    "curriculum.background_scoring": True},
    # the warm start with β's rollouts off the critical path too (curriculum.background_rollouts): the scorer rolls
    # the pool and target sets out before it scores, so stage 0 trains on the whole pool from the run's first second
    # (until the switch, the same steps dynamic sampling trains) and the switch comes at the same clock, more steps in
    "cropi_first1_r10_dynamic_bgroll": {"selection.policy": "cropi", "selection.ratio": 0.1,
                                        "grpo.dynamic_sampling": {"enabled": True}, "curriculum.selected_stages": 1,
                                        "curriculum.background_scoring": True, "curriculum.background_rollouts": True},
    # the same with the selection held through stage 1: β's rollouts in the scorer put the switch ~45 steps into
    # stage 0, so the selection would train only its last few steps; holding it gives it stage 1 as well
    "cropi_first2_hold_r10_dynamic_bgroll": {"selection.policy": "cropi", "selection.ratio": 0.1,
                                             "grpo.dynamic_sampling": {"enabled": True}, "curriculum.selected_stages": 2,
                                             "curriculum.select_every": 2, "curriculum.background_scoring": True,
                                             "curriculum.background_rollouts": True},
    # the warm start off the critical path with the cheap, lossy scoring of the last layer (truncated backward):
    # the scorer takes ~60% of the time, so the selection arrives earlier in stage 0 and trains more of its steps
    "cropi_first1_r10_dynamic_last1_bg": {"selection.policy": "cropi", "selection.ratio": 0.1,
                                          "grpo.dynamic_sampling": {"enabled": True}, "curriculum.selected_stages": 1,
                                          "scoring.last_layers": 1, "scoring.truncate_backward": True,
                                          "curriculum.background_scoring": True},
    # the same selection held a stage longer (curriculum.select_every: 2 over selected_stages: 2): it arrives ~35 steps
    # into stage 0 and trains the rest of it and all of stage 1, as long as the foreground warm start's does; one
    # scoring, nothing on the critical path
    "cropi_first2_hold_r10_dynamic_bg": {"selection.policy": "cropi", "selection.ratio": 0.1,
                                         "grpo.dynamic_sampling": {"enabled": True}, "curriculum.selected_stages": 2,
                                         "curriculum.select_every": 2, "curriculum.background_scoring": True},
    # every stage selects off the critical path: each stage trains on the whole pool (dynamic sampling) while the
    # scorer ranks the pool at θ_m (β's rollouts, off-policy), then on that stage's top 10% for the rest of it; the
    # selection steers every stage and never waits, and the pool's breadth comes back at each stage's start
    "cropi_r10_dynamic_bg": {"selection.policy": "cropi", "selection.ratio": 0.1,
                             "grpo.dynamic_sampling": {"enabled": True}, "curriculum.background_scoring": True},
    # the warm start's control: a random 10% of the pool for stage 0 (no β rollouts, no scoring), then the same
    "random_first1_r10_dynamic": {"selection.policy": "random", "selection.ratio": 0.1,
                                  "grpo.dynamic_sampling": {"enabled": True}, "curriculum.selected_stages": 1},
    # the same without influence: refreshed every stage, a random 30% of the prompts with reward variance at θ_m
    # (K = 8: pass rates 1/8..7/8), dynamic sampling; what the on-policy zero-variance filter alone is worth
    "band_refresh1_r30_dynamic": {"selection.policy": "pass_rate_band", "selection.pass_rate_band": [0.1, 0.9],
                                  "curriculum.refresh_behaviour_every": 1, "selection.ratio": 0.3,
                                  "grpo.dynamic_sampling": {"enabled": True}},
}
REFERENCE = "full"
# the CROPI setting of examples/configs/tiny_cpu.yaml (a unit test checks they agree): the default headline
CPU_DEFAULT_METHOD = "cropi_first1_r10_dynamic_bg"
# what runs by default: the reference, the four selectors users would pick instead, the paper's CROPI and
# the CPU default's (every other variant by --methods)
DEFAULT_METHODS = ["full", "random", "learnability", "online_learnability", "dynamic_sampling", "cropi",
                   CPU_DEFAULT_METHOD]
HEADLINE = CPU_DEFAULT_METHOD
KEY = "target_sampled"
COLORS = {"cropi": "C3", "full": "C0", "random": "C7", "learnability": "C2", "online_learnability": "C1",
          "dynamic_sampling": "C4", "cropi_dynamic": "C5", "cropi_guard": "C6", "cropi_refresh": "C8", "cropi_r30": "C9",
          "cropi_r50_dynamic": "C5", "cropi_refresh1": "C8", "cropi_refresh1_r30_dynamic": "C6",
          "cropi_refresh1_r10_dynamic": "C3", "cropi_refresh1_r10_dynamic_last1": "C1",
          "band_refresh1_r30_dynamic": "C2", "cropi_first1_r10_dynamic": "C5",
          "cropi_first1_r10_dynamic_last1": "C6", "random_first1_r10_dynamic": "C8",
          "cropi_first1_r10_dynamic_bg": "C3", "cropi_r10_dynamic_bg": "C1", "cropi_first1_r10_dynamic_bgroll": "C2",
          "cropi_first2_hold_r10_dynamic_bgroll": "C8",
          "cropi_first2_hold_r10_dynamic_bg": "C6", "cropi_first1_r10_dynamic_last1_bg": "C9"}
# two-sided 95% Student-t quantiles t_{0.975, df}; beyond 30 degrees of freedom 1.96 is used
T975 = [None, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
        2.042]


def set_key(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = json.loads(json.dumps(value))


def base_config(args) -> dict:
    cfg = yaml.safe_load((ROOT / "examples/configs/tiny_cpu.yaml").read_text())
    cfg["run"]["num_threads"] = 1
    cfg["rollout"]["progress"] = False
    cfg["data"]["synthetic"]["target"] = args.target
    # the paper's setting is every method's base (the CPU default selects for the first stage only and turns on
    # dynamic sampling: the cropi_first1_r10_dynamic method); each method's overrides then change only its own keys
    cfg["selection"]["ratio"] = 0.1
    cfg["curriculum"]["refresh_behaviour_every"] = 0
    cfg["curriculum"]["selected_stages"] = 0
    cfg["curriculum"]["background_scoring"] = False
    cfg["grpo"]["dynamic_sampling"] = {"enabled": False}
    cfg["curriculum"]["stages"] = args.stages
    cfg["curriculum"]["steps_per_stage"] = args.steps_per_stage
    cfg["curriculum"]["eval"]["every"] = args.eval_every
    cfg["curriculum"]["eval"]["max_prompts"] = args.eval_max_prompts
    cfg["curriculum"]["probe_prompts"] = 0
    cfg["curriculum"]["plot"] = False
    return cfg


def cores_of(cfg: dict) -> int:
    """Cores a run occupies: 2 with ``curriculum.background_scoring`` (the trainer and the scorer), else 1."""
    return 2 if cfg["curriculum"].get("background_scoring") else 1


class CoreTickets:
    """Runs take the cores they occupy (:func:`cores_of`) in submission order, so that a run with a
    background scorer never shares a core with another run's trainer (its scorer would slow that run's
    clock), and a two-core run is not starved by one-core runs behind it."""

    def __init__(self, cores: int):
        self.free, self.cores, self.turn, self.issued = cores, cores, 0, 0
        self.cond = threading.Condition()

    def ticket(self) -> int:
        with self.cond:
            self.issued += 1
            return self.issued - 1

    def run(self, ticket: int, need: int, fn, *args):
        need = min(need, self.cores)
        with self.cond:
            self.cond.wait_for(lambda: self.turn == ticket and self.free >= need)
            self.free -= need
            self.turn += 1
            self.cond.notify_all()
        try:
            return fn(*args)
        finally:
            with self.cond:
                self.free += need
                self.cond.notify_all()


def run_cli(cfg: dict, out: Path, log: Path) -> dict:
    """One ``cropi run`` in a fresh process; returns ``{"ok", "rc", "wall_seconds", "log"}``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"==== cropi run {path} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "megatron_cropi.cli", "run", str(path)], stdout=f,
                            stderr=subprocess.STDOUT, env=env).returncode
    return {"ok": rc == 0, "rc": rc, "wall_seconds": time.perf_counter() - t0, "log": str(log)}


def log_tail(log: str | Path, lines: int = 3) -> str:
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def eval_records(run_dir: Path) -> list[dict]:
    """A run's evaluation records, each with ``compute_seconds``: its run clock plus the background scorer's
    seconds so far (``curriculum.background_scoring``; 0 for every other method)."""
    path = run_dir / "metrics" / "eval.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []
    for r in records:
        r["compute_seconds"] = r["clock_seconds"] + r.get("background_seconds", 0.0)
    return records


def final_accuracy(records: list[dict], key: str = KEY) -> float:
    """Final accuracy: the mean of the last two evaluations."""
    return float(np.mean([r[key] for r in records[-2:]]))


def first_reaching(records: list[dict], threshold: float, key: str = KEY) -> dict | None:
    """The first evaluation record at which ``key`` reaches ``threshold`` (None if none does)."""
    for r in records:
        if r.get(key, -1.0) >= threshold - 1e-12:
            return r
    return None


def ratio(reference: list[dict], method: list[dict], threshold: float, axis: str) -> dict:
    """The time (``axis``: step or clock seconds) ``reference`` needs to reach ``threshold`` over the time
    ``method`` needs.

    ``status``: ``ok``; ``not_reached`` (the method never reaches it); ``reference_not_reached``;
    ``at_start`` (one of them reaches it at the step-0 evaluation of β, so there is nothing to
    accelerate and the ratio is undefined)."""
    r_ref = first_reaching(reference, threshold)
    r_m = first_reaching(method, threshold)
    t_ref = float(r_ref[axis]) if r_ref else None
    t_m = float(r_m[axis]) if r_m else None
    if r_m is None:
        status, value = "not_reached", None
    elif r_ref is None:
        status, value = "reference_not_reached", None
    elif r_m["step"] == 0 or r_ref["step"] == 0 or t_m <= 0:
        status, value = "at_start", None
    else:
        status, value = "ok", t_ref / t_m
    return {"threshold": threshold, "reference": t_ref, "method": t_m, "value": value, "status": status}


def interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval of ``values`` (None where fewer than two)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0}
    mean = float(np.mean(values))
    if n == 1:
        return {"mean": mean, "ci95": None, "sd": None, "n": 1}
    sd = float(np.std(values, ddof=1))
    t = T975[n - 1] if n - 1 < len(T975) else 1.96
    half = t * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "sd": sd, "n": n}


def summarize(per_seed: list[dict]) -> dict:
    """Per-seed ``{"seed", "value", "status"}`` -> the interval over the seeds with a value, and counts."""
    values = [e["value"] for e in per_seed if e["status"] == "ok"]
    out = interval(values)
    counts: dict[str, int] = {}
    for e in per_seed:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    out["reached"] = counts.get("ok", 0)
    out["not_reached"] = counts.get("not_reached", 0)
    out["without_value"] = {k: v for k, v in counts.items() if k != "ok"}
    out["status_counts"] = counts
    out["per_seed"] = per_seed
    return out


def warmup_info(run_dir: Path) -> dict:
    """The warm-up's record in ``state.json`` (``steps``, ``greedy_val``, ``reached_threshold``...)."""
    path = run_dir / "state.json"
    return json.loads(path.read_text()).get("info", {}).get("warmup", {}) if path.exists() else {}


def behaviour_policy(cfg0: dict, out: Path, attempts: int) -> tuple[Path, list[dict]]:
    """β's HF directory: the first warm-up that reaches ``curriculum.warmup.stop_at_greedy`` on the target.

    The tiny model's warm-up has a phase transition whose step varies with the batches it draws: on one
    family it came at 1,400 steps in one run and not within the 3,000-step cap in another; on `add4` two
    attempts ended at 0.09 and 0.0 after 3,000 steps. Retries therefore allow twice the steps. A β that never
    crossed it solves almost no target prompt, so no method has anything to learn from. Attempt ``a``
    draws its batches with ``run.seed + a`` (the suite's prompts, pool and evaluation sets do not depend
    on it); when none of ``attempts`` tries reaches it, the β with the best greedy target accuracy is
    used (the first of equals) and the result says so."""
    warmups = []
    for attempt in range(attempts):
        warm = json.loads(json.dumps(cfg0))
        name = "warmup" if attempt == 0 else f"warmup-a{attempt}"
        warm["run"]["output_dir"] = str(out / name)
        warm["run"]["seed"] = cfg0["run"]["seed"] + attempt
        if attempt:  # a harder family's transition can come later: retries may run twice as long
            warm["curriculum"]["warmup"]["max_steps"] = 2 * cfg0["curriculum"]["warmup"]["max_steps"]
        warm["selection"]["policy"] = "full"
        warm["curriculum"]["stages"] = 1
        warm["curriculum"]["steps_per_stage"] = 0
        run = run_cli(warm, out / name, out / f"{name}.log")
        if not run["ok"]:
            sys.exit(f"the warm-up failed (exit {run['rc']}); see {run['log']}\n{log_tail(run['log'])}")
        info = {"dir": name, "run_seed": warm["run"]["seed"], "max_steps": warm["curriculum"]["warmup"]["max_steps"],
                **warmup_info(out / name)}
        warmups.append(info)
        if info.get("reached_threshold", True):
            break
        print(f"[curriculum] warm-up attempt {attempt + 1}: greedy target accuracy {info.get('greedy_val')} after "
              f"{info.get('steps')} steps, below the threshold; trying another batch seed", file=sys.stderr)
    chosen = warmups[-1] if warmups[-1].get("reached_threshold", True) else \
        max(warmups, key=lambda w: (w.get("greedy_val", 0.0), -warmups.index(w)))
    for w in warmups:
        w["chosen"] = w is chosen
    return out / chosen["dir"] / "warmup" / "hf", warmups


def main() -> None:
    from megatron_cropi.data.synthetic import FAMILIES, TARGET_FAMILY

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds × 4 stages × 25 steps (unless given)")
    ap.add_argument("--target", default=TARGET_FAMILY, help=f"target family, one of {', '.join(FAMILIES)}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5; 2 with --quick)")
    ap.add_argument("--headline", default=None, choices=[m for m in METHODS if m.startswith("cropi")],
                    help=f"the CROPI variant the last JSON line reports (default {CPU_DEFAULT_METHOD}, the CPU "
                         "default's setting, when it runs; else the first cropi method of --methods)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {', '.join(METHODS)} (must include {REFERENCE}; default "
                         f"{','.join(DEFAULT_METHODS)})")
    ap.add_argument("--stages", type=int, default=None)
    ap.add_argument("--steps-per-stage", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=10, help="GRPO steps between evaluations")
    ap.add_argument("--eval-max-prompts", type=int, default=0,
                    help="evaluate at most this many prompts per set, for every method (0: all)")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--warmup-attempts", type=int, default=3,
                    help="warm-ups tried (each with another batch seed) until one reaches the threshold")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/curriculum/<target>)")
    args = ap.parse_args()
    if args.target not in FAMILIES:
        ap.error(f"unknown target family {args.target!r}; the synthetic suite's families are: {', '.join(FAMILIES)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    global HEADLINE
    # the CROPI variant the last line reports (module-level: the summaries read it)
    HEADLINE = args.headline or (CPU_DEFAULT_METHOD if CPU_DEFAULT_METHOD in methods else
                                 next((m for m in methods if m.startswith("cropi")), CPU_DEFAULT_METHOD))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if REFERENCE not in methods:
        ap.error(f"--methods must include {REFERENCE!r}: its final accuracy is the threshold")
    methods = list(dict.fromkeys(methods))
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    args.stages = args.stages or (4 if args.quick else 6)
    args.steps_per_stage = args.steps_per_stage or (25 if args.quick else 50)
    out = Path(args.out) if args.out else ROOT / "benchmarks/results/curriculum" / args.target
    out.mkdir(parents=True, exist_ok=True)
    cfg0 = base_config(args)
    t_start = time.perf_counter()

    # 1. the shared behaviour policy β: warm-up only (one stage of zero GRPO steps)
    beta, warmups = behaviour_policy(cfg0, out, args.warmup_attempts)

    # 2. every method × seed from β
    jobs = []
    for seed in range(args.seeds):
        for method in methods:
            cfg = json.loads(json.dumps(cfg0))
            cfg["run"]["seed"] = 1000 + seed
            cfg["run"]["output_dir"] = str(out / f"{method}-s{seed}")
            cfg["curriculum"]["warmup"]["enabled"] = False
            cfg["rollout"]["checkpoint"] = str(beta)
            for key, value in METHODS[method].items():
                set_key(cfg, key, value)
            jobs.append((method, seed, cfg))
    runs_info: dict[tuple[str, int], dict] = {}
    tickets = CoreTickets(args.workers)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(tickets.run, tickets.ticket(), cores_of(cfg), run_cli, cfg, Path(cfg["run"]["output_dir"]),
                               Path(cfg["run"]["output_dir"] + ".log")): (m, s) for m, s, cfg in jobs}
        for fut, key in futures.items():
            runs_info[key] = fut.result()
            if not runs_info[key]["ok"]:
                print(f"[curriculum] {key[0]} seed {key[1]} failed (exit {runs_info[key]['rc']}); "
                      f"see {runs_info[key]['log']}", file=sys.stderr)

    runs: dict[tuple[str, int], list[dict]] = {}
    for (m, s), info in runs_info.items():
        recs = eval_records(out / f"{m}-s{s}") if info["ok"] else []
        if info["ok"] and len(recs) < 2:
            info.update(ok=False, error="fewer than two evaluations in metrics/eval.jsonl")
        if info["ok"]:
            runs[(m, s)] = recs
        else:
            info.setdefault("error", log_tail(info["log"]))
    failed = {m: {"seeds": [s for s in range(args.seeds) if (m, s) not in runs],
                  "logs": [runs_info[(m, s)]["log"] for s in range(args.seeds) if (m, s) not in runs],
                  "error": next(runs_info[(m, s)].get("error", "") for s in range(args.seeds) if (m, s) not in runs)}
              for m in methods if any((m, s) not in runs for s in range(args.seeds))}
    ok_seeds = {m: [s for s in range(args.seeds) if (m, s) in runs] for m in methods}

    # 3. figures per method and seed
    def final_of(m: str, s: int) -> dict:
        recs = runs[(m, s)]
        return {KEY: final_accuracy(recs), "target_greedy": recs[-1].get("target_greedy"),
                "check_greedy": recs[-1].get("check_greedy"), "clock_seconds": recs[-1]["clock_seconds"],
                "background_seconds": recs[-1].get("background_seconds", 0.0),
                "eval_seconds": float(sum(r.get("seconds", 0.0) for r in recs)), "evaluations": len(recs),
                "wall_seconds": runs_info[(m, s)]["wall_seconds"]}

    finals = {m: {s: final_of(m, s) for s in ok_seeds[m]} for m in methods}

    def vs_reference(m: str, axis: str) -> dict:
        per_seed = []
        for s in range(args.seeds):
            if (m, s) not in runs:
                per_seed.append({"seed": s, "value": None, "status": "failed"})
            elif (REFERENCE, s) not in runs:
                per_seed.append({"seed": s, "value": None, "status": "reference_failed"})
            else:
                thr = finals[REFERENCE][s][KEY]
                per_seed.append({"seed": s, **ratio(runs[(REFERENCE, s)], runs[(m, s)], thr, axis)})
        return summarize(per_seed)

    def delta_pts(m: str, key: str) -> dict:
        per_seed = []
        for s in range(args.seeds):
            a = finals[m].get(s, {}).get(key)
            b = finals[REFERENCE].get(s, {}).get(key)
            ok = a is not None and b is not None
            per_seed.append({"seed": s, "value": 100.0 * (a - b) if ok else None, "status": "ok" if ok else "failed"})
        return summarize(per_seed)

    by_method = {}
    for m in methods:
        by_method[m] = {
            "overrides": METHODS[m],
            "seeds_ok": ok_seeds[m],
            "final_target_sampled": interval([finals[m][s][KEY] for s in ok_seeds[m]]),
            "final_target_greedy": interval([finals[m][s]["target_greedy"] for s in ok_seeds[m]
                                             if finals[m][s]["target_greedy"] is not None]),
            "final_check_greedy": interval([finals[m][s]["check_greedy"] for s in ok_seeds[m]
                                            if finals[m][s]["check_greedy"] is not None]),
            "clock_seconds_final": interval([finals[m][s]["clock_seconds"] for s in ok_seeds[m]]),
            # work beside training (curriculum.background_scoring), not on the clock: compute = clock + this
            "background_seconds_final": interval([finals[m][s]["background_seconds"] for s in ok_seeds[m]]),
            "eval_seconds": interval([finals[m][s]["eval_seconds"] for s in ok_seeds[m]]),
            "step_acceleration": vs_reference(m, "step"),
            "wallclock_acceleration": vs_reference(m, "clock_seconds"),
            # the same on run clock + background scorer seconds: what the method costs in core-seconds
            "compute_acceleration": vs_reference(m, "compute_seconds"),
            "untargeted_delta_pts": delta_pts(m, "check_greedy"),
            "per_seed": {str(s): finals[m][s] for s in ok_seeds[m]},
        }

    # best baseline: the non-CROPI method with the highest mean final target accuracy
    baselines = [m for m in methods if not m.startswith("cropi") and ok_seeds[m]]
    best = max(baselines, key=lambda m: by_method[m]["final_target_sampled"]["mean"]) if baselines else None
    vs_best = None
    if best is not None and HEADLINE in methods:
        per_seed_clock, per_seed_step = [], []
        for s in range(args.seeds):
            if (HEADLINE, s) not in runs or (best, s) not in runs:
                per_seed_clock.append({"seed": s, "value": None, "status": "failed"})
                per_seed_step.append({"seed": s, "value": None, "status": "failed"})
                continue
            thr = finals[best][s][KEY]
            per_seed_clock.append({"seed": s, **ratio(runs[(best, s)], runs[(HEADLINE, s)], thr, "clock_seconds")})
            per_seed_step.append({"seed": s, **ratio(runs[(best, s)], runs[(HEADLINE, s)], thr, "step")})
        vs_best = {"baseline": best, "wallclock": summarize(per_seed_clock), "step": summarize(per_seed_step)}

    initial = runs[(REFERENCE, ok_seeds[REFERENCE][0])][0] if ok_seeds[REFERENCE] else {}
    head = by_method.get(HEADLINE)
    result = {
        "target": args.target, "seeds": args.seeds, "methods": methods, "stages": args.stages,
        "steps_per_stage": args.steps_per_stage, "eval_every": args.eval_every,
        "eval_max_prompts": args.eval_max_prompts, "metric": KEY,
        "interval": "95% Student-t interval over seeds: mean ± t(0.975, n-1)·sd/√n, over the seeds with a value",
        "threshold": f"{REFERENCE}'s final {KEY} per seed (mean of its last two evaluations)",
        "warmup_seconds": sum(float(w.get("seconds", 0.0)) for w in warmups), "total_seconds": None,
        "warmups": warmups,
        "beta_reached_threshold": bool(next(w for w in warmups if w["chosen"]).get("reached_threshold", True)),
        "initial": {k: initial.get(k) for k in (KEY, "target_greedy", "check_greedy")},
        "failed": failed,
        "best_baseline": best,
        "wallclock_vs_best_baseline_detail": vs_best,
        "by_method": by_method,
    }

    def mean_of(block):
        return block["mean"] if block else None

    result["step_acceleration"] = mean_of(head and head["step_acceleration"])
    result["wallclock_acceleration"] = mean_of(head and head["wallclock_acceleration"])
    result["compute_acceleration"] = mean_of(head and head["compute_acceleration"])
    result["wallclock_vs_best_baseline"] = mean_of(vs_best and vs_best["wallclock"])
    result["untargeted_delta_pts"] = mean_of(head and head["untargeted_delta_pts"])
    plot(runs, methods, args, out / "curriculum.png")
    result["total_seconds"] = time.perf_counter() - t_start
    (out / "result.json").write_text(json.dumps(result, indent=2))

    # a readable table, then the one JSON line
    print(f"target {args.target}, {args.seeds} seeds, {args.stages} × {args.steps_per_stage} steps; "
          f"threshold = {REFERENCE}'s final accuracy; 95% t-intervals; results in {out / 'result.json'}")
    for m in methods:
        b = by_method[m]
        if not ok_seeds[m]:
            print(f"  {m:20s} FAILED in every seed; see {failed[m]['logs'][0]}")
            continue
        sa, wa = b["step_acceleration"], b["wallclock_acceleration"]
        print(f"  {m:20s} final {b['final_target_sampled']['mean']:.3f}  step× {fmt(sa)}  clock× {fmt(wa)}  "
              + (f"compute× {fmt(b['compute_acceleration'])}  " if m == HEADLINE else "")
              + f"untargeted {fmt(b['untargeted_delta_pts'])} pts"
              + (f"  (failed seeds {failed[m]['seeds']})" if m in failed else ""))
    if vs_best:
        print(f"  {HEADLINE} vs best baseline ({best}), run clock: {fmt(vs_best['wallclock'])}")

    def ci(block):
        return block["ci95"] if block else None

    line = {
        "step_acceleration": result["step_acceleration"],
        "wallclock_acceleration": result["wallclock_acceleration"],
        "wallclock_vs_best_baseline": result["wallclock_vs_best_baseline"],
        "untargeted_delta_pts": result["untargeted_delta_pts"],
        "seeds": args.seeds, "target": args.target,
        "compute_acceleration": result["compute_acceleration"],
        "step_acceleration_ci95": ci(head and head["step_acceleration"]),
        "wallclock_acceleration_ci95": ci(head and head["wallclock_acceleration"]),
        "wallclock_vs_best_baseline_ci95": ci(vs_best and vs_best["wallclock"]),
        "untargeted_delta_pts_ci95": ci(head and head["untargeted_delta_pts"]),
        "not_reached": {"step": head["step_acceleration"]["not_reached"] if head else None,
                        "wallclock": head["wallclock_acceleration"]["not_reached"] if head else None,
                        "vs_best_baseline": vs_best["wallclock"]["not_reached"] if vs_best else None},
        "seeds_without_value": {
            "step": head["step_acceleration"]["without_value"] if head else None,
            "wallclock": head["wallclock_acceleration"]["without_value"] if head else None,
            "vs_best_baseline": vs_best["wallclock"]["without_value"] if vs_best else None,
            "untargeted": head["untargeted_delta_pts"]["without_value"] if head else None},
        "best_baseline": best,
        "final_target_sampled": {m: by_method[m]["final_target_sampled"]["mean"] for m in methods},
        "failed": sorted(failed),
        "beta_reached_threshold": result["beta_reached_threshold"],
        "result": str(out / "result.json"),
    }
    print(json.dumps(line))


def fmt(block: dict) -> str:
    if block["mean"] is None:
        s = "n/a"
    elif block["ci95"] is None:
        s = f"{block['mean']:.2f}"
    else:
        s = f"{block['mean']:.2f} [{block['ci95'][0]:.2f}, {block['ci95'][1]:.2f}]"
    missing = block.get("without_value") or {}
    if missing:
        s += " (" + ", ".join(f"{n} seed(s) {k.replace('_', ' ')}" for k, n in missing.items()) + ")"
    return s


def plot(runs: dict, methods: list[str], args, path: Path) -> None:
    """Mean target accuracy against step and against the run clock, and check accuracy against step,
    per method; the band is the seeds' min–max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for m in methods:
        curves = [runs[(m, s)] for s in range(args.seeds) if (m, s) in runs]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        color = COLORS.get(m)
        for ax, key, axis in ((axes[0], KEY, "step"), (axes[1], KEY, "clock_seconds"),
                              (axes[2], "check_greedy", "step")):
            xs = np.array([[r[axis] for r in c[:n]] for c in curves], dtype=float)
            ys = np.array([[r.get(key, np.nan) for r in c[:n]] for c in curves], dtype=float)
            ax.plot(xs.mean(0), ys.mean(0), "-o", color=color, label=f"{m} ({len(curves)})", markersize=2.5)
            if len(curves) > 1:
                ax.fill_between(xs.mean(0), ys.min(0), ys.max(0), color=color, alpha=0.15)
    axes[0].set(xlabel="GRPO step", ylabel=f"target accuracy ({args.target}, sampled, T=1)", title="target vs step")
    axes[1].set(xlabel="run clock (s): rollouts + scoring + selection + training",
                title="target vs run clock (evaluation not charged)")
    axes[2].set(xlabel="GRPO step", ylabel="untargeted check accuracy (greedy)", title="untargeted families")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"curriculum benchmark, target {args.target}: mean over seeds, band = seeds' min–max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
