"""``cropi status RUN_DIR``: where a ``cropi run`` is, read from its files while it runs or after.

    cropi status runs/qwen2.5-7b-instruct_2node          # text
    cropi status runs/tiny_cpu --json                     # the same as one JSON object

Reads only what the run writes atomically (:class:`~megatron_cropi.layout.RunLayout`): ``state.json``
(finished steps, GRPO step, the run clock, what each step reported), ``selections/stage{m}.json``,
``reports/stage{m}.json``, ``metrics/eval.jsonl`` and the sizes of the directory's parts. It starts
nothing and takes no lock, so it is safe next to a running job on a shared filesystem.

Shown: the stage and GRPO step, whether the run finished (else how long ago ``state.json`` last
changed), time per phase (the run clock: rollouts, scoring, selection, training; the warm-up and the
evaluations), an estimate of the time left from the phases' rates so far, disk per part, the last
evaluation, and the last selection's source mix with the health signals of selection: the projection
probe (Spearman and precision@10% of projected vs exact cosines), the share of zero-variance pool prompts
(all K rewards equal: no gradient, never selectable by influence) and the target prompts that carry the
target direction. With ``curriculum.background_scoring``, the stage's background job still in flight
(``background/stage{m}/``): submitted, taken by a scoring job (``taken.json``: an external one says how
many processes it has), done, or failed (``error.json``); an external job nobody has taken is named, since
the run waits for it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from megatron_cropi.layout import RunLayout

__all__ = ["cmd_status", "run_status", "format_status"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    """The complete records of a JSON-lines file another process may be appending to."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return out


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:  # removed while we walk (a pruned feature store, a rotated checkpoint)
            pass
    return total


def _disk(layout: RunLayout) -> dict[str, int]:
    parts = {p.name: _dir_bytes(p) for p in sorted(layout.root.iterdir())} if layout.root.is_dir() else {}
    return {"total": sum(parts.values()), **{k: v for k, v in parts.items() if v}}


def _last_stage(done: list[str], prefix_step: str) -> int | None:
    stages = [int(m.group(1)) for s in done if (m := re.fullmatch(rf"stage(\d+)/{prefix_step}", s))]
    return max(stages) if stages else None


def _selection_health(layout: RunLayout, stage: int, info: dict) -> dict:
    selection = _read_json(layout.selection(stage)) or {}
    summary = selection.get("summary", {})
    held = summary.get("held_from_stage")
    if held is not None and held != stage:  # curriculum.select_every: the health of the selection it holds
        return {**_selection_health(layout, int(held), info), "stage": stage, "held_from_stage": int(held)}
    report = _read_json(layout.stage_report(stage)) or {}
    pool = info.get(f"stage{stage}/score/pool", {})
    probe = info.get(f"stage{stage}/probe") or report.get("projection_probe") or {}
    selected = len(selection.get("prompt_ids", [])) or summary.get("selected", 0)
    out = {"stage": stage, "policy": selection.get("policy"), "selected": selected,
           "pool": summary.get("pool") or summary.get("candidates"),
           "source_mix": summary.get("source_mix", {}),
           "mean_pass_rate": summary.get("mean_pass_rate"),
           "overlap_with_previous": report.get("overlap_with_previous")}
    if pool.get("rows"):
        out["zero_variance_share"] = pool.get("excluded", 0) / pool["rows"]
        out["zero_variance_prompts"], out["pool_scored"] = pool.get("excluded", 0), pool["rows"]
    if {"spearman", "precision_at_10pct"} & set(probe):
        out["probe"] = {k: probe[k] for k in ("spearman", "precision_at_10pct", "probe_prompts") if k in probe}
    elif probe:
        out["probe"] = {"skipped": probe.get("skipped", "no probe (curriculum.probe_prompts: 0)")}
    targets = summary.get("targets", {})
    if targets:
        out["target_prompts_used"] = {n: {"used": t.get("target_prompts_used"), "of": t.get("target_prompts")}
                                      for n, t in targets.items()}
    return out


def _background_job(layout: RunLayout, done: list[str], stages: int, scorer: str, now: float) -> dict | None:
    """The newest stage's background job whose selection is not recorded yet, from its files."""
    for stage in reversed(range(stages)):
        here = layout.background(stage)
        job = _read_json(here / "job.json")
        if job is None or f"stage{stage}/select" in done:
            continue
        attempt = job.get("attempt")
        mine = (lambda name: (d := _read_json(here / name)) is not None and d.get("attempt") == attempt)
        out = {"stage": stage, "scorer": scorer, "submitted_seconds_ago": now - (here / "job.json").stat().st_mtime,
               "taken": mine("taken.json"), "result": mine("result.json")}
        if out["taken"]:
            out["world"] = _read_json(here / "taken.json").get("world")
        if mine("error.json"):
            out["error"] = _read_json(here / "error.json").get("error")
        beat = _read_json(layout.background_root / "serving.json")
        if scorer == "external" and beat and "time" in beat:
            out["heartbeat_seconds_ago"] = now - float(beat["time"])
        return out
    return None


def _estimate_left(clock: dict, step: int, total_steps: int, selects_done: int, stages: int,
                   evals: list[dict], eval_every: int) -> float | None:
    """Seconds left at the rates so far: training per step, scoring + selection per stage, evaluations."""
    if step <= 0 or not clock.get("training"):
        return None
    left = (total_steps - step) * clock["training"] / step
    if selects_done:
        left += (stages - selects_done) * (clock.get("scoring", 0.0) + clock.get("selection", 0.0)) / selects_done
    if evals and eval_every:
        left += (total_steps - step) / eval_every * sum(r.get("seconds", 0.0) for r in evals) / len(evals)
    return max(left, 0.0)


def run_status(run_dir: str | Path, *, now: float | None = None) -> dict:
    """Everything ``cropi status`` shows, as plain data.

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``state.json`` (not a ``cropi run`` directory).
    """
    layout = RunLayout(run_dir)
    state = _read_json(layout.state)
    if state is None:
        raise FileNotFoundError(f"{layout.state} does not exist or cannot be read: not a `cropi run` directory "
                                "(cropi train writes under train/)")
    now = time.time() if now is None else now
    cfg = state.get("config", {})
    cur = cfg.get("curriculum", {})
    stages, per_stage = int(cur.get("stages", 0)), int(cur.get("steps_per_stage", 0))
    done, info = state.get("done", []), state.get("info", {})
    evals = _read_jsonl(layout.eval_log)
    selected_stage = _last_stage(done, "select")
    clock = {k: float(v) for k, v in state.get("clock", {}).items()}
    finished = "final_hf" in done
    step = int(state.get("train_step", 0))
    out = {
        "run_dir": str(layout.root), "finished": finished, "policy": cfg.get("selection", {}).get("policy"),
        "stage": int(state.get("stage", 0)), "stages": stages, "train_step": step,
        "total_steps": stages * per_stage, "last_done": done[-1] if done else None,
        "seconds_since_update": now - float(state.get("updated", now)),
        "seconds_since_start": float(state.get("updated", now)) - float(state.get("started", now)),
        "clock_seconds": clock, "warmup_seconds": info.get("warmup", {}).get("seconds"),
        "background_seconds": {k: float(v) for k, v in state.get("background_clock", {}).items()},
        "eval_seconds": sum(r.get("seconds", 0.0) for r in evals),
        "disk_bytes": _disk(layout),
        "last_eval": {k: v for k, v in evals[-1].items() if not isinstance(v, dict)} if evals else None,
        "last_selection": _selection_health(layout, selected_stage, info) if selected_stage is not None else None,
    }
    if cur.get("background_scoring") and not finished:
        out["background_job"] = _background_job(layout, done, stages, cur.get("background_scorer", "child"), now)
    if not finished:
        # curriculum.selected_stages: only the first stages score and select; the rest add training only; of them
        # (curriculum.select_every) only every R-th scores, the others hold its selection
        selecting, every = min(int(cur.get("selected_stages", 0) or 0) or stages, stages), int(cur.get("select_every", 1))
        scoring = [m for m in range(selecting) if m % every == 0]
        selects_done = len([s for s in done
                            if (m := re.fullmatch(r"stage(\d+)/select", s)) and int(m.group(1)) in scoring])
        out["estimated_seconds_left"] = _estimate_left(
            clock, step, stages * per_stage, selects_done, len(scoring), evals, int(cur.get("eval", {}).get("every", 0)))
    return out


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def format_status(s: dict) -> str:
    """The text form of :func:`run_status`."""
    if s["finished"]:
        where = "finished"
    else:
        where = f"not finished; state.json updated {_hms(s['seconds_since_update'])} ago"
    lines = [f"run        {s['run_dir']} ({where})",
             f"policy     {s['policy']}, {s['stages']} stages, {s['total_steps']} GRPO steps",
             f"stage      {s['stage']} (stages 0-{max(s['stages'] - 1, 0)}); last finished step: {s['last_done']}",
             f"GRPO step  {s['train_step']} / {s['total_steps']}"]
    clock = s["clock_seconds"]
    phases = ", ".join(f"{k} {_hms(v)}" for k, v in clock.items())
    extra = [f"warm-up {_hms(s['warmup_seconds'])}"] if s["warmup_seconds"] else []
    if s.get("background_seconds"):  # curriculum.background_scoring: beside the run clock, not on it
        extra.append(f"background scorer {_hms(sum(s['background_seconds'].values()))}")
    extra.append(f"evaluation {_hms(s['eval_seconds'])}")
    lines.append(f"time       run clock {_hms(sum(clock.values()))} ({phases or 'nothing yet'}); " + ", ".join(extra)
                 + f"; wall {_hms(s['seconds_since_start'])}")
    if "estimated_seconds_left" in s:
        lines.append(f"time left  ~{_hms(s['estimated_seconds_left'])} at the rates so far (estimate)")
    job = s.get("background_job")
    if job:
        if job.get("error"):
            what = f"failed: {job['error']}"
        elif job["result"]:
            what = "scored and selected; the stage switches before its next step"
        elif job["taken"]:
            size = f" ({job['world']} processes)" if job.get("world") else ""
            what = f"taken by the scoring job{size}, working"
            if job.get("heartbeat_seconds_ago", 0) > 60:
                what += f"; its last heartbeat is {_hms(job['heartbeat_seconds_ago'])} old: it may have died, relaunch it"
        elif job["scorer"] == "external":
            what = ("not taken by any scoring job yet: launch `torchrun ... -m megatron_cropi.cli serve-scoring CONFIG` "
                    "with the run's config")
        else:
            what = "submitted to the run's scorer process"
        lines.append(f"background stage {job['stage']}, submitted {_hms(job['submitted_seconds_ago'])} ago: {what}")
    disk = s["disk_bytes"]
    ranked = sorted(((k, v) for k, v in disk.items() if k != "total"), key=lambda kv: -kv[1])
    if len(ranked) > 6:
        ranked = [*ranked[:5], ("other", sum(v for _, v in ranked[5:]))]
    parts = ", ".join(f"{k} {_size(v)}" for k, v in ranked)
    lines.append(f"disk       {_size(disk['total'])}" + (f": {parts}" if parts else ""))
    if s["last_eval"]:
        e = s["last_eval"]
        vals = ", ".join(f"{k} {v:.3f}" for k, v in e.items()
                         if k not in ("step", "seconds", "clock_seconds", "background_seconds") and isinstance(v, float))
        lines.append(f"last eval  step {e.get('step')}: {vals}")
    sel = s["last_selection"]
    if sel:
        mix = ", ".join(f"{k} {v / max(sel['selected'], 1):.0%}" for k, v in
                        sorted(sel["source_mix"].items(), key=lambda kv: -kv[1]))
        held = (f", stage {sel['held_from_stage']}'s held (curriculum.select_every)"
                if sel.get("held_from_stage") is not None else "")
        lines.append(f"selection  stage {sel['stage']} ({sel['policy']}{held}): {sel['selected']} of {sel['pool']} "
                     "prompts" + (f"; mix {mix}" if mix else ""))
        health = []
        probe = sel.get("probe")
        if probe and "spearman" in probe:
            health.append(f"probe Spearman {probe['spearman']:.3f}, precision@10% {probe['precision_at_10pct']:.2f} "
                          f"({probe.get('probe_prompts', '?')} prompts)")
        elif probe:
            health.append(f"probe: {probe['skipped']}")
        if "zero_variance_share" in sel:
            health.append(f"zero-variance pool prompts {sel['zero_variance_prompts']} of {sel['pool_scored']} "
                          f"({sel['zero_variance_share']:.0%})")
        for name, t in sel.get("target_prompts_used", {}).items():
            health.append(f"target {name}: {t['used']} of {t['of']} prompts used")
        if sel.get("overlap_with_previous") is not None:
            health.append(f"overlap with previous stage {sel['overlap_with_previous']:.0%}")
        if health:
            lines.append("health     " + "; ".join(health))
    return "\n".join(lines)


def cmd_status(args) -> int:
    """The ``cropi status`` subcommand: text, or JSON with ``--json``."""
    import sys

    try:
        status = run_status(args.run_dir)
    except FileNotFoundError as err:
        print(f"cropi status: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0
