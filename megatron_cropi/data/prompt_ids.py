"""Stable prompt ids and duplicate removal.

A prompt's id is a content hash of what defines it as a task: the prompt text and the reference answer
(``blake2b`` of both, 16 bytes, hex). The same question with the same answer gets the same id on every
machine and in every run, whatever file or row it came from; tokenization and templates are not part
of it (the trajectory store's header records the tokenizer instead).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from megatron_cropi.records import PromptRecord

__all__ = ["prompt_id", "pool_hash", "DedupReport", "dedup_prompts"]

_SEP = "\x1f"  # ASCII unit separator: cannot occur in a question/answer pair by accident of concatenation


def prompt_id(text: str, answer: str) -> str:
    """The stable id of a prompt: ``blake2b(text ␟ answer)``, 32 hex characters."""
    digest = hashlib.blake2b(f"{text}{_SEP}{answer}".encode("utf-8"), digest_size=16)
    return digest.hexdigest()


def pool_hash(prompt_ids: Iterable[str]) -> str:
    """Order-independent identity of a set of prompts (the sorted ids hashed), 32 hex characters."""
    h = hashlib.blake2b(digest_size=16)
    for pid in sorted(prompt_ids):
        h.update(pid.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class DedupReport:
    """What :func:`dedup_prompts` removed.

    Attributes:
        kept: prompts kept.
        duplicates: prompts dropped because an earlier one had the same id.
        by_source: duplicates per ``PromptRecord.source``.
    """

    kept: int = 0
    duplicates: int = 0
    by_source: dict[str, int] = field(default_factory=dict)


def dedup_prompts(records: Sequence[PromptRecord]) -> tuple[list[PromptRecord], DedupReport]:
    """Keep the first record of each prompt id, in input order; count the rest."""
    seen: set[str] = set()
    out: list[PromptRecord] = []
    report = DedupReport()
    for rec in records:
        if rec.prompt_id in seen:
            report.duplicates += 1
            report.by_source[rec.source] = report.by_source.get(rec.source, 0) + 1
            continue
        seen.add(rec.prompt_id)
        out.append(rec)
    report.kept = len(out)
    return out, report
