"""The prompt sets of a run, from its :class:`~megatron_cropi.data.config.DataConfig`.

``load_prompt_set(cfg, "pool")`` returns the de-duplicated prompts of one split with a report of what
was read, dropped and removed; ``build_tokenizer(cfg)`` the tokenizer they were encoded with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_cropi.data.char_tokenizer import CharTokenizer
from megatron_cropi.data.config import SPLITS, DataConfig
from megatron_cropi.data.loaders import FileReport, load_dataset_file
from megatron_cropi.data.prompt_ids import DedupReport, dedup_prompts
from megatron_cropi.data.tokenizer import HFTokenizer, TextTokenizer
from megatron_cropi.records import PromptRecord

__all__ = ["PromptSet", "build_tokenizer", "load_prompt_set"]


@dataclass
class PromptSet:
    """One split's prompts.

    Attributes:
        split: pool, val, test or check.
        records: de-duplicated prompts, in file (or draw) order.
        dedup: duplicates removed (by prompt id) and counted.
        files: per-file read reports (empty for the synthetic suite).
        counts: prompts per source after de-duplication.
    """

    split: str
    records: list[PromptRecord]
    dedup: DedupReport
    files: list[FileReport] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        """Plain-data summary for logs and reports."""
        return {
            "split": self.split, "prompts": len(self.records), "duplicates_removed": self.dedup.duplicates,
            "too_long_dropped": sum(f.too_long for f in self.files), "rows_read": sum(f.rows for f in self.files),
            "by_source": dict(self.counts),
        }


def build_tokenizer(cfg: DataConfig) -> TextTokenizer:
    """The synthetic suite's :class:`CharTokenizer`, or the configured HF tokenizer directory."""
    if cfg.kind == "synthetic":
        return CharTokenizer(cfg.synthetic.prompt_length)
    return HFTokenizer(cfg.tokenizer, use_chat_template=cfg.use_chat_template, system_prompt=cfg.system_prompt)


def load_prompt_set(cfg: DataConfig, split: str, *, tokenizer: TextTokenizer | None = None) -> PromptSet:
    """The de-duplicated prompts of ``split``.

    Raises:
        KeyError: unknown split.
        DataError: a malformed file or row (naming file, row and field).
    """
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    tok = tokenizer or build_tokenizer(cfg)
    files: list[FileReport] = []
    if cfg.kind == "synthetic":
        from megatron_cropi.data.synthetic import build_synthetic_sets

        s = cfg.synthetic
        sets = build_synthetic_sets(seed=s.seed, per_family=s.per_family, val_size=s.val_size,
                                    test_size=s.test_size, check_per_family=s.check_per_family, target=s.target,
                                    families=s.families or None, tokenizer=tok)
        records = sets.split(split)
    else:
        records = []
        for spec in cfg.files(split):
            recs, rep = load_dataset_file(spec, tok, prompt_template=cfg.prompt_template,
                                          max_prompt_tokens=cfg.max_prompt_tokens, split=split)
            records.extend(recs)
            files.append(rep)
    kept, dedup = dedup_prompts(records)
    counts: dict[str, int] = {}
    for r in kept:
        counts[r.source] = counts.get(r.source, 0) + 1
    return PromptSet(split, kept, dedup, files, counts)
