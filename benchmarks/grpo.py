"""GRPO step cost on the embedded CPU default's shape, phase by phase, on 1 rank and on DP=2.

Workload (the CPU default's GRPO settings, docs/design.md §10): the ``cpu-default`` policy (0.38M parameters),
32 synthetic-suite prompts × K=8 samples at T=1, up to 6 new tokens, one update per step, Adam, the
native sampler; the *easy* reward (first token a digit, :mod:`megatron_cropi.testing.grpo_tiny`) so that groups
have reward variance from a random initialisation and no step is skipped. Each configuration runs in
fresh processes with one torch thread per rank; the first ``warmup`` steps are not timed.

Reported per configuration: median seconds per step and of its phases (rollout = generate + reward,
train = advantages + forward/backward over the micro-batches + optimizer, KL reference pass included
when ``--kl``), and response tokens trained per second. ``dp2_speedup`` is DP=1's median step time over
DP=2's, measured in this run (each DP rank rolls out and trains on half the prompts). ``dp1_uncached``
is DP=1 with the native sampler's KV cache off (``rollout.native.kv_cache: false``, every decode step
reruns the whole sequence); ``kv_cache_speedup_dp1`` its step time over the cached DP=1's, and
``kv_cache_rollout_speedup_dp1`` the same for the rollout phase (``--no-uncached`` skips it).

    python benchmarks/grpo.py --quick        # < 3 minutes on the 2-core CPU box

The last line printed is a JSON object. The plain-PyTorch prototype of the calibration took ≈0.26 s
per step for this workload (its own model, 1 thread, another run): a reference point, not a ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _worker(steps: int, warmup: int, kl: float, kv_cache: bool = True):
    import torch.distributed as dist

    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.records import SamplingParams

    init_distributed()
    g = build_parallel_groups(1, 1)
    grpo = {"steps": steps + warmup, "prompts_per_step": 32, "micro_batch_prompts": 32,
            "loss": {"kl_coef": kl, "entropy_coef": 0.0}, "optim": {"lr": 3e-4, "weight_decay": 0.0}}
    trainer = build_tiny_trainer(g, grpo, model={"preset": "cpu-default"}, prompts=easy_prompts(160),
                                 sampling=SamplingParams(n=8, temperature=1.0, max_tokens=6, seed=1),
                                 kv_cache=kv_cache)
    rows = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        m = trainer.step()
        wall = time.perf_counter() - t0
        if i >= warmup:
            rows.append({"step_s": wall, "rollout_s": m["rollout_seconds"], "train_s": m["train_seconds"],
                         "tokens": m["response_tokens"], "reward": m["reward"], "skipped": m["skipped"]})
    return rows if dist.get_rank() == 0 else None


def _summary(rows):
    med = {k: statistics.median(r[k] for r in rows) for k in ("step_s", "rollout_s", "train_s")}
    med["train_tokens_per_s"] = statistics.median(r["tokens"] / r["train_s"] for r in rows)
    med["skipped_steps"] = sum(r["skipped"] for r in rows)
    med["reward_first_last"] = [rows[0]["reward"], rows[-1]["reward"]]
    return med


def main(argv=None) -> int:
    from megatron_cropi.testing.spawn import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 timed steps per configuration")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kl", type=float, default=0.0, help="KL coefficient (> 0 adds the reference forward)")
    ap.add_argument("--no-uncached", action="store_true", help="skip DP=1 without the sampler's KV cache")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    steps, warmup = (10, 2) if args.quick else (args.steps, 3)
    result = {"workload": {"model": "cpu-default", "prompts_per_step": 32, "k": 8, "max_tokens": 6, "threads_per_rank": 1,
                           "kl_coef": args.kl, "timed_steps": steps}}
    for dp in (1, 2):
        print(f"[grpo bench] DP={dp} ...", file=sys.stderr)
        rows = run_ranks(_worker, dp, args=(steps, warmup, args.kl), timeout_s=600)[0]
        result[f"dp{dp}"] = _summary(rows)
    if not args.no_uncached:
        print("[grpo bench] DP=1, no KV cache ...", file=sys.stderr)
        rows = run_ranks(_worker, 1, args=(steps, warmup, args.kl, False), timeout_s=600)[0]
        result["dp1_uncached"] = _summary(rows)
        result["kv_cache_speedup_dp1"] = result["dp1_uncached"]["step_s"] / result["dp1"]["step_s"]
        result["kv_cache_rollout_speedup_dp1"] = result["dp1_uncached"]["rollout_s"] / result["dp1"]["rollout_s"]
    result["dp2_speedup"] = result["dp1"]["step_s"] / result["dp2"]["step_s"]
    result["train_over_rollout_dp1"] = result["dp1"]["train_s"] / result["dp1"]["rollout_s"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"grpo{'_quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
