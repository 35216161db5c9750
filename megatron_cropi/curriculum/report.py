"""Per-stage reports, influence metrics in TensorBoard, the final summary and its accuracy plot.

A stage report (``reports/stage{m}.json`` and ``.md``) holds the counts (pool, selected, zero-variance
excluded, flagged), the score distribution, the overlap with the previous stage's selection, the
pass rate and task mix of the selected prompts, the projection quality on a probe set (projected vs
exact cosine to the target direction, for models small enough to hold exact per-prompt gradients),
and the time each step took.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from megatron_cropi.utils.atomic import atomic_write_json, atomic_write_text

__all__ = ["write_stage_report", "write_final_report", "plot_accuracy", "probe_projection_quality"]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1]) if a.size > 2 else float("nan")


def probe_projection_quality(ctl, m: int, features: dict) -> dict:
    """Projected vs exact cosines to the (first) target direction on a probe set of pool prompts.

    Exact per-prompt gradients come from the same capture with an exact (identity) projector, so this
    runs only when the scored parameters fit ``curriculum.probe_max_params``.
    """
    from megatron_cropi.curriculum.steps import read_store_groups
    from megatron_cropi.influence.feature_store import DONE, FeatureStore
    from megatron_cropi.influence.scorer import score_pool
    from megatron_cropi.popi.capture import select_layouts
    from megatron_cropi.projection.exact import ExactProjector
    from megatron_cropi.selection.scores import cosine_scores, target_direction

    cfg = ctl.cfg
    n_probe = cfg.curriculum.probe_prompts
    if n_probe <= 0 or not features:
        return {"skipped": "no probe set (curriculum.probe_prompts: 0) or no features"}
    layouts = select_layouts(ctl.rt.model, ctl.groups, include=cfg.scoring.include_params,
                             exclude=cfg.scoring.exclude_params)
    projector = ExactProjector.for_layouts(layouts.values(), ctl.groups)
    if projector.k > cfg.curriculum.probe_max_params:
        return {"skipped": f"{projector.k} scored parameters exceed curriculum.probe_max_params"}
    target_name = sorted(n for n in features if n.startswith("target-"))[0]
    out = {}
    vecs = {}
    for name in ("pool", target_name):
        fs = FeatureStore.load(features[name])
        usable = np.flatnonzero(fs.statuses() == DONE)
        if usable.size < 3:
            return {"skipped": f"{name} has {usable.size} prompts with a gradient (need 3)"}
        rng = np.random.default_rng([cfg.run.seed, m, len(name)])
        limit = n_probe if name == "pool" else cfg.selection.max_target_prompts
        rows = np.sort(rng.permutation(usable)[:limit]) if name == "pool" else np.sort(
            target_direction(fs.matrix(), fs.statuses() == DONE, max_prompts=limit, seed=cfg.run.seed)[1])
        groups_list, sp = read_store_groups(ctl, name)
        temperature = sp.temperature if sp.logprobs == "sampling" and sp.temperature > 0 else 1.0
        exact = _ExactSink(len(rows), projector.k)
        score_pool([groups_list[i] for i in rows], exact if ctl.rank0 else None, model=ctl.rt.model,
                   groups=ctl.groups, projector=projector, cfg=cfg.scoring, temperature=temperature,
                   responses_per_prompt=sp.n, pad_id=ctl.rt.pad_id, progress=False)
        vecs[name] = (rows, fs.matrix()[rows], exact.features)
    if not ctl.rank0:
        return out
    prow, pproj, pexact = vecs["pool"]
    _, tproj, texact = vecs[target_name]
    ok = np.ones(len(prow), bool)
    c_proj = cosine_scores(pproj, ok, tproj.mean(0))
    c_exact = cosine_scores(pexact, ok, texact.mean(0))
    top = max(1, len(prow) // 10)
    best_p = set(np.argsort(-c_proj)[:top])
    best_e = set(np.argsort(-c_exact)[:top])
    out = {"probe_prompts": int(len(prow)), "target": target_name,
           "spearman": _spearman(c_proj, c_exact), "pearson": float(np.corrcoef(c_proj, c_exact)[0, 1]),
           "precision_at_10pct": len(best_p & best_e) / top,
           "mean_abs_cosine_error": float(np.mean(np.abs(c_proj - c_exact)))}
    return out


class _ExactSink:
    """A stand-in feature store in memory for the probe (same write API)."""

    def __init__(self, n: int, k: int):
        self.features = np.zeros((n, k), np.float32)
        self._status = np.zeros(n, np.uint8)

    def statuses(self):
        return self._status

    def write_rows(self, rows, features, status):
        self.features[np.asarray(rows)] = features
        self._status[np.asarray(rows)] = status


def write_stage_report(ctl, m: int, selection, features: dict) -> dict:
    """Write ``reports/stage{m}.{json,md}`` and the stage's influence metrics; return the report."""
    from megatron_cropi.curriculum.steps import load_selection

    state = ctl.state
    T = ctl.cfg.curriculum.steps_per_stage
    if not ctl.rank0:
        return {}
    probe = state.info(f"stage{m}/probe") or {"skipped": "no probe"}
    prev = load_selection(ctl, m - 1) if m > 0 else None
    overlap = (len(set(selection.prompt_ids) & set(prev.prompt_ids)) / max(len(selection.prompt_ids), 1)
               if prev else None)
    scoring = {k.split("/")[-1]: state.info(k) for k in state.data.get("info", {}) if k.startswith(f"stage{m}/score/")}
    train_info = state.info(f"stage{m}/train")
    report = {
        "stage": m,
        "steps": [m * T, (m + 1) * T],
        "policy": selection.policy,
        "selected": len(selection.prompt_ids),
        "selection": selection.summary,
        "overlap_with_previous": overlap,
        "scoring": scoring,
        "projection_probe": probe,
        "train_step_after": train_info.get("step"),
        "written": time.time(),
    }
    pool_scoring = scoring.get("pool", {})
    tb = {"selected": len(selection.prompt_ids),
          "selected_mean_pass_rate": selection.summary.get("mean_pass_rate", float("nan")),
          "zero_variance_prompts": pool_scoring.get("excluded", float("nan")),
          "flagged_prompts": pool_scoring.get("flagged", float("nan")),
          "seconds_per_scored_prompt": (pool_scoring.get("seconds", np.nan) / max(pool_scoring.get("scored", 0), 1)
                                        if pool_scoring else float("nan")),
          "selection_seconds": selection.summary.get("seconds", float("nan"))}
    if overlap is not None:
        tb["overlap_with_previous"] = overlap
    for key in ("spearman", "precision_at_10pct"):
        if key in probe:
            tb[f"probe_{key}"] = probe[key]
    for src, count in selection.summary.get("source_mix", {}).items():
        tb[f"mix/{src}"] = count / max(len(selection.prompt_ids), 1)
    ctl.metrics.log(m * T, tb, prefix="influence")
    writer = getattr(ctl.metrics, "_writer", None)
    if writer is not None and selection.scores and selection.policy == "cropi":
        writer.add_histogram("influence/selected_scores", np.asarray(selection.scores), global_step=m * T)
    out = ctl.out / "reports"
    atomic_write_json(out / f"stage{m}.json", report)
    atomic_write_text(out / f"stage{m}.md", _stage_markdown(report))
    return report


def _stage_markdown(r: dict) -> str:
    s = r["selection"]
    lines = [f"# Stage {r['stage']} (GRPO steps {r['steps'][0]}–{r['steps'][1]})", "",
             f"- policy: **{r['policy']}**; selected {r['selected']} of {s.get('pool')} prompts "
             f"(budget {s.get('budget')})"]
    if "fallback" in s:
        lines.append(f"- fallback: {s['fallback']}")
    if "zero_gradient_prompts" in s:
        lines.append(f"- prompts without a gradient (all rewards equal or flagged): {s['zero_gradient_prompts']}")
    if r["overlap_with_previous"] is not None:
        lines.append(f"- overlap with the previous stage's selection: {r['overlap_with_previous']:.1%}")
    lines.append(f"- mean behaviour pass rate of the selection: {s.get('mean_pass_rate', float('nan')):.3f}")
    if "cosine_quantiles" in s:
        q = s["cosine_quantiles"]
        lines.append("- cosine to the target: " + ", ".join(f"q{float(k):g} = {v:.3f}" for k, v in q.items()))
    lines.append("- task mix: " + ", ".join(f"{k} {v}" for k, v in s.get("source_mix", {}).items()))
    for name, st in r["scoring"].items():
        if st:
            lines.append(f"- scoring {name}: {st.get('scored')} scored, {st.get('excluded')} excluded, "
                         f"{st.get('flagged')} flagged, {st.get('seconds', 0):.1f} s")
    p = r["projection_probe"]
    if "spearman" in p:
        lines.append(f"- projection quality on {p['probe_prompts']} probe prompts: Spearman {p['spearman']:.3f}, "
                     f"precision@10% {p['precision_at_10pct']:.2f}, mean |Δcos| {p['mean_abs_cosine_error']:.4f}")
    else:
        lines.append(f"- projection probe: {p.get('skipped', '-')}")
    return "\n".join(lines) + "\n"


def plot_accuracy(records: list[dict], path: Path, *, title: str, stage_steps: int = 0) -> None:
    """PNG of target accuracy (sampled, greedy) and check-set accuracy against GRPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, style in (("target_sampled", "target, sampled T=1 (pass@1)", "-o"),
                              ("target_greedy", "target, greedy", "--s"), ("check_greedy", "untargeted check, greedy", ":^")):
        ys = [r.get(key) for r in records]
        if any(y is not None for y in ys):
            ax.plot(steps, [np.nan if y is None else y for y in ys], style, label=label, markersize=4)
    if stage_steps:
        for s in range(stage_steps, max(steps + [0]) + 1, stage_steps):
            ax.axvline(s, color="grey", alpha=0.25, lw=0.8)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_final_report(ctl, seconds: float) -> dict:
    """``summary.json``, ``summary.md`` and ``accuracy.png`` of the whole run (rank 0)."""
    eval_path = ctl.out / "metrics" / "eval.jsonl"
    records = [json.loads(x) for x in eval_path.read_text().splitlines() if x] if eval_path.exists() else []
    info = ctl.state.data.get("info", {})
    timing = {"warmup": info.get("warmup", {}).get("seconds", 0.0),
              "scoring": sum(v.get("seconds", 0.0) for k, v in info.items() if "/score/" in k),
              "selection": sum(v.get("seconds", 0.0) for k, v in info.items() if k.endswith("/select")),
              "eval": sum(r.get("seconds", 0.0) for r in records), "total_this_process": seconds}
    cfg = ctl.cfg
    summary = {"output_dir": str(ctl.out), "policy": cfg.selection.policy, "stages": cfg.curriculum.stages,
               "steps_per_stage": cfg.curriculum.steps_per_stage, "eval": records, "timing_seconds": timing,
               "final": records[-1] if records else {}, "initial": records[0] if records else {},
               "warmup": {k: v for k, v in info.get("warmup", {}).items()}}
    atomic_write_json(ctl.out / "summary.json", summary)
    if cfg.curriculum.plot and records:
        plot_accuracy(records, ctl.out / "accuracy.png",
                      title=f"{cfg.selection.policy}: target {ctl.prompts.target_family}",
                      stage_steps=cfg.curriculum.steps_per_stage)
    lines = ["# Run summary", "", f"policy {cfg.selection.policy}, {cfg.curriculum.stages} stages × "
             f"{cfg.curriculum.steps_per_stage} GRPO steps", "", "| step | target sampled | target greedy | check greedy |",
             "| --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['step']} | {r.get('target_sampled', float('nan')):.3f} | "
                     f"{r.get('target_greedy', float('nan')):.3f} | {r.get('check_greedy', float('nan')):.3f} |")
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items())]
    atomic_write_text(ctl.out / "summary.md", "\n".join(lines) + "\n")
    return summary
