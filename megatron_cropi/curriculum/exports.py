"""A stage's selection as the dataset files other trainers read, beside ``selections/stage{m}.json``.

``cropi select`` writes them for its one selection, and an external trainer stage
(:mod:`.external`) hands them to the user's command. The formats: :mod:`megatron_cropi.data.exports`.
"""

from __future__ import annotations

from pathlib import Path

from megatron_cropi.curriculum import steps
from megatron_cropi.data.exports import export_rows, write_slime_jsonl, write_verl_parquet
from megatron_cropi.layout import RunLayout
from megatron_cropi.selection.policies import Selection

__all__ = ["selection_exports", "export_selection"]


def selection_exports(layout: RunLayout, stage: int) -> tuple[Path, Path]:
    """``(parquet, jsonl)``: where a selection's verl and slime exports sit, beside ``selections/stage{M}.json``."""
    base = layout.selection(stage)
    return base.with_suffix(".parquet"), base.with_suffix(".jsonl")


def export_selection(cfg, layout: RunLayout, stage: int, pool, selection: Selection) -> tuple[Path, Path]:
    """Write the selection as verl Parquet and slime JSONL (:mod:`megatron_cropi.data.exports`; call on
    global rank 0); returns their paths.

    The user message is the question as the policy saw it: ``data.prompt_template`` and
    ``data.system_prompt`` for files, the bare prompt for the synthetic suite."""
    files = cfg.data.kind == "files"
    rows = export_rows(steps.selected_prompts(pool, selection), selection.scores,
                       prompt_template=cfg.data.prompt_template if files else "{prompt}",
                       system_prompt=cfg.data.system_prompt if files else "")
    parquet, jsonl = selection_exports(layout, stage)
    return write_verl_parquet(parquet, rows), write_slime_jsonl(jsonl, rows)
