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

from megatron_cropi.layout import RunLayout
from megatron_cropi.selection.policies import Selection
from megatron_cropi.selection.stored import read_selection
from megatron_cropi.utils.atomic import atomic_write_json, atomic_write_text
from megatron_cropi.utils.rank_zero import on_rank0

__all__ = ["write_stage_report", "publish_stage_report", "stage_scalars", "policy_label", "write_final_report",
           "plot_accuracy"]


def write_stage_report(m: int, selection: Selection, previous: Selection | None, *, step_info: dict[str, dict],
                       steps_per_stage: int, layout: RunLayout) -> dict:
    """Write ``reports/stage{m}.{json,md}``; return the report (its TensorBoard scalars: :func:`stage_scalars`).

    Args:
        previous: stage ``m - 1``'s selection (None at stage 0).
        step_info: what each finished step of the stage recorded in ``state.json``, by step name
            (``stage{m}/probe``, ``stage{m}/score/<set>``, ``stage{m}/online_rollouts``, ``stage{m}/train``).

    Call on global rank 0 only (it writes files).
    """
    first_step = m * steps_per_stage
    probe = step_info.get(f"stage{m}/probe") or {"skipped": "no probe"}
    overlap = (len(set(selection.prompt_ids) & set(previous.prompt_ids)) / max(len(selection.prompt_ids), 1)
               if previous else None)
    scoring = {k.split("/")[-1]: v for k, v in step_info.items() if k.startswith(f"stage{m}/score/")}
    train_info = step_info.get(f"stage{m}/train", {})
    report = {
        "stage": m,
        "steps": [first_step, first_step + steps_per_stage],
        "policy": selection.policy,
        "selected": len(selection.prompt_ids),
        "selection": selection.summary,
        "overlap_with_previous": overlap,
        "scoring": scoring,
        "projection_probe": probe,
        "train_step_after": train_info.get("step"),
        "written": time.time(),
    }
    if f"stage{m}/online_rollouts" in step_info:  # online_learnability: the pool rolled out at θ_m
        report["online_rollouts"] = step_info[f"stage{m}/online_rollouts"]
    select_info = step_info.get(f"stage{m}/select", {})
    if select_info.get("background"):  # curriculum.background_scoring: the pool until the selection was ready
        report["background_scoring"] = {"switch_step": select_info.get("switch_step"),
                                        "seconds": select_info.get("background_seconds")}
    if f"stage{m}/refresh" in step_info:  # the behaviour sets rolled out again at θ_m: on-policy POPI
        report["behaviour_refresh"] = step_info[f"stage{m}/refresh"]
    # the target direction rests on the target prompts that have a gradient (mixed rewards under β)
    report["target_prompts_used"] = {name: {"used": t["target_prompts_used"], "of": t.get("target_prompts")}
                                     for name, t in selection.summary.get("targets", {}).items()}
    atomic_write_json(layout.stage_report(m, "json"), report)
    atomic_write_text(layout.stage_report(m, "md"), _stage_markdown(report))
    return report


def publish_stage_report(m: int, selection: Selection, *, layout: RunLayout, step_info: dict[str, dict],
                         steps_per_stage: int, metrics) -> dict:
    """:func:`write_stage_report` on global rank 0 (against stage ``m − 1``'s selection), and the stage's
    influence scalars and score histogram logged by every rank (with PP > 1 the metrics rank, the last
    stage, is not global rank 0). Returns the report on every rank."""

    def write() -> dict:
        previous = read_selection(layout.selection(m - 1)) if m > 0 else None
        return write_stage_report(m, selection, previous, step_info=step_info, steps_per_stage=steps_per_stage,
                                  layout=layout)

    report = on_rank0(write)
    metrics.log(m * steps_per_stage, stage_scalars(report, selection), prefix="influence")
    if selection.scores and selection.policy == "cropi":
        metrics.histogram(m * steps_per_stage, "influence/selected_scores", selection.scores)
    return report


def stage_scalars(report: dict, selection: Selection) -> dict[str, float]:
    """The stage's influence metrics for TensorBoard (``influence/*``), from its report."""
    pool_scoring = report["scoring"].get("pool", {})
    probe = report["projection_probe"]
    scalars = {"selected": len(selection.prompt_ids),
               "selected_mean_pass_rate": selection.summary.get("mean_pass_rate", float("nan")),
               "zero_variance_prompts": pool_scoring.get("excluded", float("nan")),
               "flagged_prompts": pool_scoring.get("flagged", float("nan")),
               "seconds_per_scored_prompt": (pool_scoring.get("seconds", np.nan) / max(pool_scoring.get("scored", 0), 1)
                                             if pool_scoring else float("nan")),
               "selection_seconds": selection.summary.get("seconds", float("nan"))}
    if report["overlap_with_previous"] is not None:
        scalars["overlap_with_previous"] = report["overlap_with_previous"]
    for key in ("spearman", "precision_at_10pct"):
        if key in probe:
            scalars[f"probe_{key}"] = probe[key]
    for src, count in selection.summary.get("source_mix", {}).items():
        scalars[f"mix/{src}"] = count / max(len(selection.prompt_ids), 1)
    for name, used in report["target_prompts_used"].items():
        scalars[f"target_prompts_used/{name}"] = used["used"]
    if "guard" in selection.summary:
        scalars["guard_conflicting"] = selection.summary["guard"]["conflicting"]
    return scalars


def _stage_markdown(r: dict) -> str:
    s = r["selection"]
    lines = [f"# Stage {r['stage']} (GRPO steps {r['steps'][0]}–{r['steps'][1]})", "",
             f"- policy: **{r['policy']}**; selected {r['selected']} of {s.get('pool')} prompts "
             f"(budget {s.get('budget')})"]
    if s.get("held_from_stage") is not None:
        lines.append(f"- stage {s['held_from_stage']}'s selection again (curriculum.select_every): no scoring or probe "
                     "here; the summary, scores and probe are that stage's")
    if "fallback" in s:
        lines.append(f"- fallback: {s['fallback']}")
    if "background_scoring" in r:
        b = r["background_scoring"]
        lines.append(f"- scored and selected in the background ({b['seconds'] or 0:.1f} s): " + (
            f"trained on the whole pool for steps {r['steps'][0]}–{b['switch_step']}, on the selection after"
            if b["switch_step"] is not None else "the selection came after the stage's last step; it trained on the "
            "whole pool"))
    if "behaviour_refresh" in r:
        lines.append(f"- behaviour sets rolled out again at this stage's checkpoint (GRPO step "
                     f"{r['behaviour_refresh'].get('policy_step')}, {r['behaviour_refresh'].get('seconds', 0):.1f} s)")
    if "guard" in s:
        g = s["guard"]
        lines.append(f"- guard ({g['source']}, {g['mode']}, cos < {g['threshold']:g} conflicts): {g['conflicting']} of "
                     f"{g['candidates']} candidates conflict; direction from {g['guard_prompts_used']} guard prompts")
    if "zero_gradient_prompts" in s:
        lines.append(f"- prompts without a gradient (all rewards equal or flagged): {s['zero_gradient_prompts']}")
    if r["overlap_with_previous"] is not None:
        lines.append(f"- overlap with the previous stage's selection: {r['overlap_with_previous']:.1%}")
    lines.append(f"- mean behaviour pass rate of the selection: {s.get('mean_pass_rate', float('nan')):.3f}")
    if "cosine_quantiles" in s:
        q = s["cosine_quantiles"]
        lines.append("- cosine to the target: " + ", ".join(f"q{float(k):g} = {v:.3f}" for k, v in q.items()))
    lines.append("- task mix: " + ", ".join(f"{k} {v}" for k, v in s.get("source_mix", {}).items()))
    for name, used in r.get("target_prompts_used", {}).items():
        lines.append(f"- target direction {name}: built from {used['used']} of {used['of']} target prompts "
                     "(the others had all-equal behaviour rewards: no gradient)")
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


def policy_label(policy: str, selected_stages: int, stages: int, *, select_every: int = 1) -> str:
    """The policy as the run summary names it: ``cropi``, or with ``curriculum.selected_stages`` below the
    stages, ``cropi for stages 0-0, then full``; with ``curriculum.select_every`` above 1, how long each
    selection is held."""
    label = policy
    if 0 < selected_stages < stages:
        label = f"{policy} for stages 0-{selected_stages - 1}, then full (curriculum.selected_stages)"
    if select_every > 1:
        label += f", each selection held for up to {select_every} stages (curriculum.select_every)"
    return label


def write_final_report(layout: RunLayout, step_info: dict[str, dict], *, seconds: float, policy: str, stages: int,
                       steps_per_stage: int, target_family: str, plot: bool) -> dict:
    """``summary.json``, ``summary.md`` and ``accuracy.png`` of the whole run (call on rank 0).

    Args:
        step_info: what every finished step recorded in ``state.json``, by step name.
        seconds: this process's wall time.
    """
    records = ([json.loads(x) for x in layout.eval_log.read_text().splitlines() if x]
               if layout.eval_log.exists() else [])
    info = step_info
    timing = {"warmup": info.get("warmup", {}).get("seconds", 0.0),
              "scoring": sum(v.get("seconds", 0.0) for k, v in info.items() if "/score/" in k),
              "selection": sum(v.get("seconds", 0.0) for k, v in info.items() if k.endswith("/select")),
              "eval": sum(r.get("seconds", 0.0) for r in records), "total_this_process": seconds}
    summary = {"output_dir": str(layout.root), "policy": policy, "stages": stages,
               "steps_per_stage": steps_per_stage, "eval": records, "timing_seconds": timing,
               "final": records[-1] if records else {}, "initial": records[0] if records else {},
               "warmup": dict(info.get("warmup", {}))}
    atomic_write_json(layout.summary("json"), summary)
    if plot and records:
        plot_accuracy(records, layout.accuracy_plot, title=f"{policy}: target {target_family}",
                      stage_steps=steps_per_stage)
    lines = ["# Run summary", "", f"policy {policy}, {stages} stages × {steps_per_stage} GRPO steps", "", "| step | target sampled | target greedy | check greedy |",
             "| --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['step']} | {r.get('target_sampled', float('nan')):.3f} | "
                     f"{r.get('target_greedy', float('nan')):.3f} | {r.get('check_greedy', float('nan')):.3f} |")
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items())]
    atomic_write_text(layout.summary("md"), "\n".join(lines) + "\n")
    return summary
