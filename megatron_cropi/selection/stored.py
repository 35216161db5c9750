"""A stage's selection on disk: one file, or a head and one part per rank.

Whole (every policy met on global rank 0): ``selections/stage{m}.json`` holds the
:class:`~megatron_cropi.selection.policies.Selection` (rows, prompt ids, scores best first, summary).

In parts (the ``cropi`` selection of a sharded pool store, made where the scores are): each global
rank ``r`` writes the picks it holds to ``stage{m}.parts/part{r:05d}.json`` (rows, prompt ids, scores,
demoted flags; in no order), then global rank 0 writes the head ``stage{m}.json`` (stage, policy,
summary, the number of parts and no rows), so the picks never travel to one rank. The head is written
last and atomically: it is the commit, a part without a head is an unfinished selection that the next
attempt overwrites, and a reader that finds the head finds every part it names.

:func:`read_selection` returns the same :class:`Selection` for both: the parts' picks ordered as the
policies order them (not demoted first, then by score descending, then by row).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_cropi.selection.policies import Selection
from megatron_cropi.utils.atomic import atomic_write_json

__all__ = ["parts_dir", "part_path", "write_selection", "write_selection_part", "write_selection_head",
           "read_selection", "read_parts", "order_picks"]


def parts_dir(path: Path) -> Path:
    """Where the parts of the selection whose head is ``path`` (``stage{m}.json``) sit: ``stage{m}.parts``."""
    return Path(path).with_suffix(".parts")


def part_path(path: Path, rank: int) -> Path:
    return parts_dir(path) / f"part{rank:05d}.json"


def write_selection(path: Path, selection: Selection) -> None:
    """The whole selection in one file, atomically."""
    atomic_write_json(path, selection.to_dict())


def write_selection_part(path: Path, rank: int, rows: np.ndarray, prompt_ids: list[str], scores: np.ndarray,
                         demoted: np.ndarray) -> None:
    """Rank ``rank``'s picks (``[n_r]`` each, any order) of the selection whose head will be ``path``."""
    atomic_write_json(part_path(path, rank), {
        "rows": [int(r) for r in rows], "prompt_ids": list(prompt_ids), "scores": [float(s) for s in scores],
        "demoted": [bool(d) for d in demoted]})


def write_selection_head(path: Path, *, stage: int, policy: str, parts: int, summary: dict) -> None:
    """The head that commits a selection in ``parts`` parts (written after every part is on disk)."""
    atomic_write_json(path, {"stage": stage, "policy": policy, "parts": int(parts), "summary": summary})


def order_picks(rows: np.ndarray, scores: np.ndarray, demoted: np.ndarray) -> np.ndarray:
    """The order of picks best first: not demoted first, then by score descending, then by row (the order
    :func:`~megatron_cropi.selection.policies.select` gives the ``cropi`` policy's picks)."""
    return np.lexsort((np.asarray(rows, np.int64), -np.asarray(scores, np.float64), np.asarray(demoted, bool)))


def read_selection(path: Path) -> Selection | None:
    """The selection whose file (or head) is ``path``, or None when there is none yet.

    Raises:
        RuntimeError: a head names a part that is missing or unreadable (the parts directory was changed
            by hand; rerun the stage's selection).
    """
    path = Path(path)
    if not path.exists():
        return None
    head = json.loads(path.read_text())
    if "parts" not in head:
        return Selection.from_dict(head)
    rows, ids, scores, _ = read_parts(path, int(head["parts"]))
    return Selection(stage=head["stage"], policy=head["policy"], rows=[int(r) for r in rows], prompt_ids=ids,
                     scores=[float(s) for s in scores], summary=dict(head["summary"]))


def read_parts(path: Path, parts: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The picks in the ``parts`` parts of the selection whose head is (or will be) ``path``, best first
    (:func:`order_picks`): ``(rows [m] int64, prompt ids, scores [m] float64, demoted [m] bool)``.

    Raises:
        RuntimeError: a part is missing or unreadable.
    """
    rows, ids, scores, demoted = [], [], [], []
    for rank in range(parts):
        part = part_path(path, rank)
        try:
            d = json.loads(part.read_text())
        except (OSError, ValueError) as err:
            raise RuntimeError(f"selection {path} has {parts} parts but part {part} cannot be read "
                               f"({type(err).__name__}: {err}); rerun the stage's selection") from err
        rows += d["rows"]
        ids += d["prompt_ids"]
        scores += d["scores"]
        demoted += d["demoted"]
    rows_a, scores_a, demoted_a = np.asarray(rows, np.int64), np.asarray(scores, np.float64), np.asarray(demoted, bool)
    order = order_picks(rows_a, scores_a, demoted_a)
    return rows_a[order], [ids[i] for i in order], scores_a[order], demoted_a[order]
