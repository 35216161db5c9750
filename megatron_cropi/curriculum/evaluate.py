"""Accuracy of the current policy on a prompt set: sampled pass rate and greedy accuracy, per source.

The headline metric is the *sampled* pass rate (mean reward of ``samples`` responses at T = 1): a
calibration of the CPU default found greedy accuracy flat and noisy under full-data GRPO while the
sampled rate moves smoothly (the calibration in docs/design.md). Prompts are split over DP
replicas; every rank returns the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.records import PromptRecord, SamplingParams
from megatron_cropi.utils.atomic import atomic_write_text

__all__ = ["EVAL_SEED_OFFSET", "evenly_spaced", "eval_logprob_mode", "evaluate_accuracy", "evaluate_policy",
           "evaluate_runtime", "eval_line", "EvalLog"]

EVAL_SEED_OFFSET = 104729
"""Added to ``run.seed`` for the run's evaluations: they never share a sampling stream with training."""


def evenly_spaced(items: Sequence, count: int) -> list:
    """``count`` items at evenly spaced positions ``⌊i·n/count⌋`` (all of them when ``count`` is 0 or ≥ n)."""
    n = len(items)
    if not count or count >= n:
        return list(items)
    return [items[i * n // count] for i in range(count)]


def eval_logprob_mode(engine_mode: str | None, *, greedy: bool, run_mode: str) -> str:
    """The log-prob mode an evaluation asks the engine for. Evaluation reads rewards only, so: the
    engine's own mode when it fixes one at construction (vLLM refuses any other), else raw log-probs when
    greedy (what the native sampler stores at T = 0), else the run's mode."""
    if engine_mode in ("sampling", "raw"):
        return engine_mode
    return "raw" if greedy else run_mode


def evaluate_accuracy(collector, groups: ParallelGroups, prompts: Sequence[PromptRecord], sampling: SamplingParams, *,
                      samples: int, temperature: float, seed: int, max_prompts: int = 0) -> dict:
    """Pass rate of ``samples`` responses per prompt at ``temperature`` (0: greedy, one response).

    Args:
        collector: a :class:`~megatron_cropi.grpo.rollouts.RolloutCollector` (engine + rewarder).
        sampling: the run's sampling parameters (max tokens, log-prob mode).
        seed: sampling seed (an evaluation never touches the training RNG).
        max_prompts: evaluate this many prompts, evenly spaced over the set (0: all). Evenly spaced, not
            the first ones: sets are ordered by source, and a prefix would evaluate only the first sources.

    Returns:
        ``{"pass_rate": float, "prompts": int, "by_source": {source: pass rate}}``.
    """
    prompts = evenly_spaced(prompts, max_prompts)
    greedy = temperature == 0
    mode = eval_logprob_mode(getattr(collector.engine, "logprobs", None), greedy=greedy, run_mode=sampling.logprobs)
    sp = dataclasses.replace(sampling, n=1 if greedy else samples, temperature=temperature, seed=seed,
                             top_p=1.0, logprobs=mode)
    per = -(-len(prompts) // groups.dp_size)
    local = prompts[groups.dp_rank * per:(groups.dp_rank + 1) * per]
    sums: dict[str, list[float]] = {}
    if local or getattr(collector.engine, "world_collective", False):  # colocated vLLM: every rank calls
        for grp in collector.collect(local, sp, policy_version=-1):
            acc = sums.setdefault(grp.prompt.source or "all", [0.0, 0.0])
            acc[0] += float((grp.rewards > 0.5).sum())
            acc[1] += float(len(grp.rewards))
    if groups.dp_size > 1:
        parts = [None] * groups.dp_size
        dist.all_gather_object(parts, sums, group=groups.dp)
        merged: dict[str, list[float]] = {}
        for part in parts:
            for src, (ok, n) in part.items():
                m = merged.setdefault(src, [0.0, 0.0])
                m[0] += ok
                m[1] += n
        sums = merged
    total_ok = sum(v[0] for v in sums.values())
    total_n = sum(v[1] for v in sums.values())
    return {"pass_rate": total_ok / max(total_n, 1.0), "prompts": len(prompts),
            "by_source": {s: v[0] / max(v[1], 1.0) for s, v in sorted(sums.items())}}


def evaluate_policy(collector, groups: ParallelGroups, *, test: Sequence[PromptRecord], check: Sequence[PromptRecord],
                    sampling: SamplingParams, cfg, seed: int) -> dict:
    """The curriculum's evaluation of the current policy (``curriculum.eval``, ``cfg``).

    Returns ``{"target_sampled", "target_greedy"?, "check_greedy"?, "check_by_source"?}``: the target
    test set's sampled pass rate (``cfg.samples`` at ``cfg.temperature``) and greedy accuracy, and the
    untargeted check set's greedy accuracy by source. The same on every rank.
    """
    rec = {"target_sampled": evaluate_accuracy(collector, groups, test, sampling, samples=cfg.samples,
                                               temperature=cfg.temperature, seed=seed,
                                               max_prompts=cfg.max_prompts)["pass_rate"]}
    if cfg.greedy:
        rec["target_greedy"] = evaluate_accuracy(collector, groups, test, sampling, samples=1, temperature=0.0,
                                                 seed=seed, max_prompts=cfg.max_prompts)["pass_rate"]
    if cfg.check and check:
        res = evaluate_accuracy(collector, groups, check, sampling, samples=1, temperature=0.0, seed=seed,
                                max_prompts=cfg.max_prompts)
        rec["check_greedy"] = res["pass_rate"]
        rec["check_by_source"] = res["by_source"]
    return rec


def evaluate_runtime(runtime, groups: ParallelGroups, prompts, cfg, *, seed: int) -> dict:
    """:func:`evaluate_policy` of a :class:`~megatron_cropi.wiring.PolicyRuntime` now, on the run's test and
    check sets (``prompts``: the run's prompt sets); the record has ``step`` and ``seconds``."""
    from megatron_cropi.grpo.rollouts import RolloutCollector

    t0 = time.perf_counter()
    rec = {"step": runtime.trainer.step_count,
           **evaluate_policy(RolloutCollector(runtime.engine, runtime.rewarder, groups), groups, test=prompts.test,
                             check=prompts.check, sampling=runtime.sampling, cfg=cfg, seed=seed)}
    rec["seconds"] = time.perf_counter() - t0
    return rec


def eval_line(rec: dict) -> str:
    """The log line of an evaluation record."""
    return (f"[eval] step {rec['step']}: target sampled {rec['target_sampled']:.3f}"
            + (f" greedy {rec['target_greedy']:.3f}" if "target_greedy" in rec else "")
            + (f", check {rec['check_greedy']:.3f}" if "check_greedy" in rec else ""))


class EvalLog:
    """``metrics/eval.jsonl``: one JSON record per evaluation, ``{"step": N, ...}``, appended by rank 0."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def records(self) -> list[dict]:
        """Every record; a torn last line (the process died while appending) is left out."""
        lines = [x for x in self.path.read_text().splitlines() if x] if self.path.exists() else []
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path}: line {i + 1} is not JSON") from None
        return out

    def at_step(self, step: int) -> dict | None:
        """The record of ``step`` if one was written (a resumed run does not evaluate twice)."""
        return next((r for r in self.records() if r["step"] == step), None)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
            if torn:  # drop the torn record rather than glue the new one onto it
                self.truncate_after(record["step"])
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run recomputes them identically)."""
        if self.path.exists():
            keep = [json.dumps(r) for r in self.records() if r["step"] <= step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
