"""``state.json``: where a run is, and the configuration its finished work was made with.

Written atomically after every step. On restart the controller skips every step recorded as done
(the step's files are named by :class:`~megatron_cropi.layout.RunLayout`; stores refuse stale
contents by their identity headers) and resumes GRPO from the last checkpoint. A configuration change that
would invalidate finished work (seed, k, ratio, pool, ...) is refused with the changed keys named,
unless the user asks for a new run, which moves the old outputs aside (nothing is deleted).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from megatron_cropi.utils.atomic import atomic_write_json

__all__ = ["RunState", "ConfigChangedError", "config_diff", "HARMLESS_KEYS"]

# Keys that change how a run reports or how fast it goes, never what it computes.
HARMLESS_KEYS = {
    "run.output_dir", "run.num_threads", "rollout.progress", "grpo.log_interval", "curriculum.plot",
}


class ConfigChangedError(ValueError):
    """The configuration differs from the one the run's finished work was made with."""


def config_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += config_diff(old.get(key, "<absent>"), new.get(key, "<absent>"), path)
        return out
    return [] if old == new else [(prefix, old, new)]


class RunState:
    """The controller's persistent position in a run."""

    VERSION = 1

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, output_dir: str | Path, config: dict, *, new_run: bool = False) -> "RunState":
        """Open (or start) the run in ``output_dir`` for ``config`` (the resolved config as a dict).

        Raises:
            ConfigChangedError: finished work exists for another config and ``new_run`` is False.
        """
        out = Path(output_dir)
        path = out / "state.json"
        if path.exists():
            data = json.loads(path.read_text())
            changes = [c for c in config_diff(data.get("config", {}), config) if c[0] not in HARMLESS_KEYS]
            if changes and not new_run:
                lines = "\n".join(f"  {k}: {o!r} -> {n!r}" for k, o, n in changes[:20])
                raise ConfigChangedError(
                    f"{out} holds a run made with a different configuration; finished work would not match:\n"
                    f"{lines}\nrestore the old values to resume, or pass --new-run to start a new run here "
                    f"(the old outputs are moved aside, not deleted)"
                )
            if changes or new_run:
                archived = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
                out.rename(archived)
                data = None
            else:
                data["config"] = config  # harmless keys may have changed
                state = cls(path, data)
                state.save()
                return state
        out.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"version": cls.VERSION, "config": config, "done": [], "train_step": 0, "stage": 0,
                           "started": time.time()})
        state.save()
        return state

    def save(self) -> None:
        self.data["updated"] = time.time()
        atomic_write_json(self.path, self.data)

    def is_done(self, step: str) -> bool:
        return step in self.data["done"]

    def mark_done(self, step: str, info: dict | None = None) -> None:
        """Record ``step`` as finished, with what it reported (JSON-serialisable)."""
        if step not in self.data["done"]:
            self.data["done"].append(step)
        if info:
            self.data.setdefault("info", {})[step] = info
        self.save()

    def unmark(self, step: str) -> None:
        if step in self.data["done"]:
            self.data["done"].remove(step)
            self.save()

    def info(self, step: str) -> dict:
        return self.data.get("info", {}).get(step, {})

    def update(self, **values) -> None:
        self.data.update(values)
        self.save()
