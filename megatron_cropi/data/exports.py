"""A selection as the dataset files other RL trainers read: verl's Parquet and slime's JSONL.

Both files hold the selected prompts best first, one row each, with their CROPI id, score and rank
and the prompt's own fields (text, answer, source, meta), so the next stage of another trainer can
start from the file as it is, and ``cropi`` reads either file back as input (``data/config.py``
formats ``verl`` and ``slime``).

verl (``data.train_files``; the fields of verl's "Prepare Data for Post-Training" docs)::

    data_source   str                       the prompt's source (dataset or task family)
    prompt        list<{role, content}>     chat messages: an optional system message, then the user's
    ability       str                       task category ("math")
    reward_model  {style: "rule", ground_truth: str}
    extra_info    {index, prompt_id, score, rank, split}
    + prompt_id, text, answer, source, meta (JSON text), score, rank

slime (``--prompt-data FILE --input-key prompt --label-key label --apply-chat-template``)::

    {"prompt": [{role, content}, ...], "label": answer, "metadata": {prompt_id, score, rank, source},
     "prompt_text": the user message as a plain string (``--input-key prompt_text`` without a chat template),
     + prompt_id, text, answer, source, meta, score, rank}

The user message is ``prompt_template.format(prompt=text)``: what the policy was scored on (the
tokenizer's chat template is the trainer's to apply). Files are written atomically.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

from megatron_cropi.records import PromptRecord
from megatron_cropi.utils.atomic import atomic_write_bytes

__all__ = ["VERL_FIELDS", "chat_messages", "export_rows", "write_verl_parquet", "write_slime_jsonl",
           "verl_schema_problems"]

# verl's documented RL dataset fields (verl docs, "Prepare Data for Post-Training"), with the type
# each must have for verl's RLHFDataset: it applies the chat template to ``prompt``, the rule reward
# reads ``reward_model.ground_truth`` and picks the scorer by ``data_source``.
VERL_FIELDS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def chat_messages(text: str, *, prompt_template: str = "{prompt}", system_prompt: str = "") -> list[dict]:
    """``[{role, content}]``: the system message (when there is one), then the templated question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt_template.format(prompt=text)}]


def _finite(x: float) -> float | None:
    """Scores as JSON/Parquet numbers; a non-finite score (no gradient) is written as null."""
    return float(x) if math.isfinite(float(x)) else None


def export_rows(records: Sequence[PromptRecord], scores: Sequence[float], *, prompt_template: str = "{prompt}",
                system_prompt: str = "", split: str = "train") -> list[dict]:
    """One verl-format row per selected prompt, best first (rank 1 is the first record).

    Args:
        records: the selected prompts in selection order.
        scores: ``[len(records)]`` their selection scores.
    """
    if len(records) != len(scores):
        raise ValueError(f"{len(records)} records but {len(scores)} scores")
    rows = []
    for index, (rec, score) in enumerate(zip(records, scores)):
        score = _finite(score)
        rows.append({
            "data_source": rec.source or "cropi",
            "prompt": chat_messages(rec.text, prompt_template=prompt_template, system_prompt=system_prompt),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": rec.answer},
            "extra_info": {"index": index, "prompt_id": rec.prompt_id, "score": score, "rank": index + 1,
                           "split": split},
            "prompt_id": rec.prompt_id, "text": rec.text, "answer": rec.answer, "source": rec.source,
            "meta": json.dumps(rec.meta, sort_keys=True, default=str), "score": score, "rank": index + 1,
        })
    return rows


def _verl_schema():
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([
        ("data_source", pa.string()), ("prompt", pa.list_(message)), ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("prompt_id", pa.string()), ("score", pa.float64()),
                                  ("rank", pa.int64()), ("split", pa.string())])),
        ("prompt_id", pa.string()), ("text", pa.string()), ("answer", pa.string()), ("source", pa.string()),
        ("meta", pa.string()), ("score", pa.float64()), ("rank", pa.int64()),
    ])


def write_verl_parquet(path: str | Path, rows: list[dict]) -> Path:
    """Write :func:`export_rows`' rows as a verl RL Parquet file (atomically); returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_verl_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_slime_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write :func:`export_rows`' rows as a slime JSONL file (``prompt``/``label``, atomically)."""
    lines = []
    for row in rows:
        user = [m["content"] for m in row["prompt"] if m["role"] == "user"][-1]
        lines.append(json.dumps({
            "prompt": row["prompt"], "prompt_text": user, "label": row["reward_model"]["ground_truth"],
            "metadata": {k: row["extra_info"][k] for k in ("prompt_id", "score", "rank")} | {"source": row["source"]},
            **{k: row[k] for k in ("prompt_id", "text", "answer", "source", "meta", "score", "rank")},
        }, ensure_ascii=False))
    atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    return Path(path)


def verl_schema_problems(path: str | Path) -> list[str]:
    """What in the Parquet file at ``path`` does not follow verl's documented RL dataset fields (empty: none).

    Checks each field of :data:`VERL_FIELDS` is there with verl's type: ``data_source``/``ability``
    strings, ``prompt`` a non-empty list of ``{role, content}`` strings ending in a user message,
    ``reward_model`` a struct with ``style`` and a non-empty ``ground_truth``, ``extra_info`` a struct.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    problems = [f"missing field {name!r}" for name in VERL_FIELDS if name not in table.column_names]
    if problems:
        return problems
    for i, row in enumerate(table.to_pylist()):
        where = f"row {i}"
        for key in ("data_source", "ability"):
            if not isinstance(row[key], str) or not row[key]:
                problems.append(f"{where}: {key} must be a non-empty string, got {row[key]!r}")
        prompt = row["prompt"]
        if not isinstance(prompt, list) or not prompt or any(
                not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m["content"], str)
                for m in prompt):
            problems.append(f"{where}: prompt must be a list of {{role, content}} messages, got {prompt!r}")
        elif prompt[-1]["role"] != "user":
            problems.append(f"{where}: the last prompt message must be the user's, got {prompt[-1]['role']!r}")
        reward = row["reward_model"]
        if not isinstance(reward, dict) or reward.get("style") != "rule" or not reward.get("ground_truth"):
            problems.append(f"{where}: reward_model must be {{style: rule, ground_truth: <answer>}}, got {reward!r}")
        if not isinstance(row["extra_info"], dict):
            problems.append(f"{where}: extra_info must be a mapping, got {row['extra_info']!r}")
    return problems
