"""``state.json``: where a run is, and the configuration its finished work was made with.

Written atomically after every step. On restart the controller skips every step recorded as done
(the step's files are named by :class:`~megatron_cropi.layout.RunLayout`; stores refuse stale
contents by their identity headers) and resumes GRPO from the last checkpoint.

A configuration change on resume is refused only when it would make finished work wrong (seed, k,
ratio, pool, model, ...), with each changed key named, unless the user asks for a new run, which moves
the old outputs aside (nothing is deleted). These may change (:func:`classify_changes`):

* presentation and cadence (:data:`HARMLESS_KEYS`): progress bars, plots, log/eval/save intervals,
  checkpoints kept, thread count, the rollout engine's memory share, verifier workers;
* a path (:data:`CONTENT_KEYS`: data files, tokenizer, model checkpoint) that names the same content:
  the blake2b digests of both are compared (a file's bytes; a directory's files, names and bytes). The
  digest of every such path is recorded when the run starts, so a path that moved away still checks;
* a key the stored config lacks (the schema gained it after the run started) whose new value is its
  default, and a key the schema no longer has.

The defaults of keys a stored config lacks come from the current schema: ``run_config`` registers
:func:`register_config_upgrade` (the stored config read through today's dataclasses). Accepted changes
are recorded in ``config_changes``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from megatron_cropi.utils.atomic import atomic_write_json

__all__ = ["RunState", "ConfigChangedError", "config_diff", "classify_changes", "content_digest",
           "register_config_upgrade", "HARMLESS_KEYS", "CONTENT_KEYS", "ABSENT"]

# Keys that change how a run reports, how often it evaluates, saves or logs, how fast it goes or how much
# memory an engine takes, never what finished work computed.
HARMLESS_KEYS = {
    # presentation
    "run.output_dir", "run.num_threads", "rollout.progress", "grpo.log_interval", "curriculum.plot",
    # cadence (evaluations use their own seed; a resumed run restarts from a checkpoint whatever the interval)
    "grpo.eval_interval", "curriculum.eval.every", "grpo.checkpoint.save_interval", "grpo.checkpoint.keep_last",
    "curriculum.keep_features",
    # engine memory and worker counts
    "rollout.vllm.gpu_memory_utilization", "rollout.reward.num_workers",
    # an external trainer's command line (e.g. a fixed path): stages it already trained were checked
    # and stay as they are; the command only runs for stages not yet trained
    "curriculum.trainer.command",
    # where behaviour rollouts may be reused from: a reused store must match this run's identity anyway
    "curriculum.reuse_rollouts_from",
    # how long the run waits for an external scoring job nobody serves: no effect on what it computes
    "curriculum.background_wait_s",
}

# Paths that may change when what they name does not (checked by digest).
CONTENT_KEYS = (
    re.compile(r"data\.(pool|val|test|check)\[\d+\]\.path"),
    re.compile(r"data\.tokenizer"),
    re.compile(r"rollout\.(checkpoint|tokenizer_dir)"),
    re.compile(r"grpo\.checkpoint\.load"),
)

ABSENT = "<absent>"

_upgrade_stored_config: Callable[[dict], dict] | None = None


def register_config_upgrade(upgrade: Callable[[dict], dict]) -> None:
    """Set the function that reads a stored config through the current schema (keys added since get
    their defaults, keys removed are dropped); ``run_config`` registers it on import."""
    global _upgrade_stored_config
    _upgrade_stored_config = upgrade


class ConfigChangedError(ValueError):
    """The configuration differs from the one the run's finished work was made with."""


def config_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs; lists of the same length are
    compared item by item (``data.pool[0].path``), others as one value."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += config_diff(old.get(key, ABSENT), new.get(key, ABSENT), path)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and old != new:
        return [c for i, (o, n) in enumerate(zip(old, new)) for c in config_diff(o, n, f"{prefix}[{i}]")]
    return [] if old == new else [(prefix, old, new)]


def content_digest(path: str | Path) -> str | None:
    """blake2b of a file's bytes, or of a directory's visible files (relative names and bytes, sorted);
    None when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    digest = hashlib.blake2b(digest_size=20)
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _content_paths(config: dict) -> dict[str, str]:
    """``{dotted key: path}`` of every non-empty :data:`CONTENT_KEYS` value of ``config``."""
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, str) and node and any(p.fullmatch(path) for p in CONTENT_KEYS):
            out[path] = node

    walk(config, "")
    return out


def _flat_keys(config: Any, prefix: str = "") -> set[str]:
    if not isinstance(config, dict):
        return {prefix}
    return {k for key, v in config.items() for k in _flat_keys(v, f"{prefix}.{key}" if prefix else str(key))}


def _upgrade(stored: dict) -> dict:
    if _upgrade_stored_config is None:
        return stored
    try:
        return _upgrade_stored_config(stored)
    except (ValueError, TypeError, KeyError):  # a stored value today's schema rejects: compare as stored, the change is named
        return stored


def classify_changes(stored: dict, config: dict, recorded: dict | None = None
                     ) -> tuple[list[tuple[str, Any, Any, str]], list[tuple[str, Any, Any, str]]]:
    """``(accepted, refused)``: each change ``(key, old, new, why)`` from the ``stored`` config to
    ``config``; ``recorded`` is the run's ``{key: {"path", "digest"}}`` of content paths."""
    recorded = recorded or {}
    accepted, refused = [], []
    digests: dict[str, str | None] = {}

    def digest(path: str) -> str | None:
        if path not in digests:
            digests[path] = content_digest(path)
        return digests[path]

    upgraded = _upgrade(stored)
    for key, old, new in config_diff(stored, upgraded):
        if new == ABSENT and key not in _flat_keys(config):
            accepted.append((key, old, new, "no longer in the config schema"))
    for key, old, new in config_diff(upgraded, config):
        if key in HARMLESS_KEYS:
            accepted.append((key, old, new, "does not change finished work"))
        elif new == ABSENT:
            accepted.append((key, old, new, "no longer in the config schema"))
        elif any(p.fullmatch(key) for p in CONTENT_KEYS) and isinstance(old, str) and isinstance(new, str) and old:
            known = recorded.get(key, {})
            before = known.get("digest") if known.get("path") == old else None
            before = before or digest(old)
            after = digest(new) if new else None
            if before is not None and before == after:
                accepted.append((key, old, new, "same content"))
            elif before is None:
                refused.append((key, old, new, "the old path is gone and no digest of it was recorded"))
            else:
                refused.append((key, old, new, "different content" if after else "the new path does not exist"))
        else:
            refused.append((key, old, new, ""))
    return accepted, refused


class RunState:
    """The controller's persistent position in a run."""

    VERSION = 1

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, output_dir: str | Path, config: dict, *, new_run: bool = False) -> "RunState":
        """Open (or start) the run in ``output_dir`` for ``config`` (the resolved config as a dict).

        Raises:
            ConfigChangedError: finished work exists for a config that differs in a way that would make
                it wrong (:func:`classify_changes`), and ``new_run`` is False.
        """
        out = Path(output_dir)
        path = out / "state.json"
        if path.exists():
            data = json.loads(path.read_text())
            accepted, refused = classify_changes(data.get("config", {}), config, data.get("content"))
            if refused and not new_run:
                lines = "\n".join(f"  {k}: {o!r} -> {n!r}" + (f" ({why})" if why else "")
                                  for k, o, n, why in refused[:20])
                raise ConfigChangedError(
                    f"{out} holds a run made with a different configuration; finished work would not match:\n"
                    f"{lines}\nrestore the old values to resume, or pass --new-run to start a new run here "
                    f"(the old outputs are moved aside, not deleted). Presentation, cadence, engine memory and "
                    f"paths to the same content may change on resume."
                )
            if refused or new_run:
                archived = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
                out.rename(archived)
            else:
                if accepted:
                    data.setdefault("config_changes", []).append(
                        {"time": time.time(), "changes": [[k, o, n, why] for k, o, n, why in accepted]})
                data["config"] = config
                data["content"] = {**data.get("content", {}), **cls._record_content(config, data.get("content"))}
                state = cls(path, data)
                state.save()
                return state
        out.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"version": cls.VERSION, "config": config, "done": [], "train_step": 0, "stage": 0,
                           "started": time.time(), "content": cls._record_content(config)})
        state.save()
        return state

    @staticmethod
    def _record_content(config: dict, known: dict | None = None) -> dict:
        """``{key: {"path", "digest"}}`` of the config's content paths (reusing ``known`` entries for an
        unchanged path): what a later resume compares a moved path with."""
        known = known or {}
        out, by_path = {}, {}
        for key, value in _content_paths(config).items():
            if known.get(key, {}).get("path") == value and known[key].get("digest"):
                out[key] = known[key]
                continue
            if value not in by_path:
                by_path[value] = content_digest(value)
            if by_path[value] is not None:
                out[key] = {"path": value, "digest": by_path[value]}
        return out

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
