"""Reusing behaviour rollouts another run already made, when they are what this run would make.

Hours of β rollouts stay valid across runs that differ only downstream of them (selection, GRPO,
projection, ...). At the behaviour-rollouts step, for each set (``pool``, ``target-<name>``, ``guard``),
the stores ``<source>/rollouts/<set>`` of the reuse sources are tried in order:

1. ``curriculum.reuse_rollouts_from`` (another run's ``run.output_dir``), when set;
2. the run directories ``cropi run --new-run`` moved aside from this ``run.output_dir``
   (``<output_dir>.prev-<time>``, newest first).

A source store is reused when it is complete, every part verifies, and its header equals the header this
run would write (:class:`~megatron_cropi.rollout.store.StoreHeader`: sampling parameters with the seed,
tokenizer, β's identity, policy version, pool hash and size) and it was rewarded by the same reward
configuration (``extra.reward``). It is then hard-linked (copied where links cannot be made) into this
run, through a temporary sibling renamed into place, and no rollout time is charged. A source that does
not match is reported with the header fields that differ, and the set is rolled out as usual.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Sequence

from megatron_cropi.layout import RunLayout

__all__ = ["reuse_sources", "reward_identity", "store_differences", "link_store", "reuse_behaviour_store"]


def reuse_sources(output_dir: str | Path, reuse_from: str | None) -> list[Path]:
    """The run directories whose behaviour stores may be reused, in the order they are tried:
    ``reuse_from`` (``curriculum.reuse_rollouts_from``), then ``output_dir``'s moved-aside predecessors
    (``<name>.prev-<time>``, newest first). Directories that do not exist are left out."""
    out = Path(output_dir)
    sources = [Path(reuse_from)] if reuse_from else []
    aside = sorted(out.parent.glob(f"{out.name}.prev-*"), key=lambda p: p.name, reverse=True)
    found = [p for p in [*sources, *aside] if p.is_dir()]
    return list(dict.fromkeys(p.resolve() for p in found if p.resolve() != out.resolve()))


def reward_identity(reward_cfg) -> str:
    """A digest of the reward configuration the stored rewards were computed with."""
    text = json.dumps(dataclasses.asdict(reward_cfg), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def store_differences(path: Path, expected) -> list[str]:
    """Why the trajectory store at ``path`` cannot stand in for one written with header ``expected``
    (empty: it can). Each reason names what differs, e.g. ``sampling.temperature: store has 1.0, run
    expects 0.5``; ``extra.reward`` (the reward configuration) is compared too."""
    from megatron_cropi.rollout.store import StoreError, TrajectoryStore

    if not (path / "header.json").is_file():
        return [f"{path}: no trajectory store"]
    try:
        store = TrajectoryStore.open(path)
    except StoreError as err:
        return [str(err)]
    reasons = store.header.mismatches(expected)
    ours, theirs = expected.extra.get("reward"), store.header.extra.get("reward")
    if ours != theirs:
        reasons.append(f"extra.reward (the reward configuration): store has {theirs!r}, run expects {ours!r}")
    if not store.complete:
        reasons.append(f"incomplete: {len(store)} of {store.header.num_prompts} prompts stored")
    return reasons


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a copy
        shutil.copy2(src, dst)


def link_store(src: Path, dst: Path) -> None:
    """Put a copy of the store ``src`` at ``dst``: files hard-linked (copied where they cannot be) into
    a temporary sibling that is renamed into place. A partial store at ``dst`` is replaced. The stores'
    files are never modified after they are written, so linked files are safe to share."""
    tmp = dst.with_name(f".reuse-{dst.name}-{uuid.uuid4().hex[:8]}")
    try:
        for file in sorted(src.rglob("*")):
            target = tmp / file.relative_to(src)
            if file.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(file, target)
        if dst.exists():
            shutil.rmtree(dst)  # a partial rollout of this very run, superseded by the complete store
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reuse_behaviour_store(name: str, dst: Path, expected, sources: Sequence[Path],
                          log: Callable[[str], None]) -> Path | None:
    """Reuse set ``name``'s store from the first of ``sources`` whose store matches ``expected``.

    Returns the source store linked into ``dst``, or None (``dst`` already complete, or no source
    matches: each mismatching source is logged with its differing fields). Called on the writing rank.
    """
    if not sources:
        return None
    if (dst / "header.json").is_file():
        own = store_differences(dst, expected)
        if not own or not all(r.startswith("incomplete") for r in own):
            return None  # complete already, or another run's store: rolling out reports the mismatch
    for source in sources:
        src = RunLayout(source).rollouts(name)
        if not (src / "header.json").is_file():
            continue
        reasons = store_differences(src, expected)
        if reasons:
            log(f"[rollouts] {name}: not reusing {src}: " + "; ".join(reasons))
            continue
        link_store(src, dst)
        log(f"[rollouts] {name}: reused {src} (its header matches this run's; no rollout)")
        return src
    return None
