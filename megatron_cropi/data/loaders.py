"""Read GSM8K, MATH and DeepScaleR-style prompts, and verl's and slime's RL datasets, from ``.jsonl`` or
``.parquet`` files.

A prompt field holding a list of chat messages (``[{"role": ..., "content": ...}]``, as verl's
Parquet and slime's chat JSONL store them) gives the content of its last ``user`` message: that is
the question; system messages are dropped (``data.system_prompt`` sets one for the whole run).

Every row must give a non-empty UTF-8 question and a reference answer. A malformed row stops the load
with a :class:`DataError` that names the file, the row (1-based: the line of a JSONL file, the row of a
Parquet file) and the field, and says what was expected: a missing field, a wrong type, bytes that are
not UTF-8, an empty prompt, a non-finite numeric answer (NaN, ±inf), a GSM8K answer without ``####`` or a
MATH solution without ``\\boxed{}``. Silently skipping such rows would change the pool without anyone
noticing. A UTF-8 byte-order mark at the start of a JSONL file (editors, spreadsheet exports) is accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_cropi.data.config import DatasetFile
from megatron_cropi.data.prompt_ids import prompt_id
from megatron_cropi.data.tokenizer import TextTokenizer
from megatron_cropi.rewards.extract import extract_gsm8k_answer, last_boxed
from megatron_cropi.records import PromptRecord

__all__ = ["DataError", "FileReport", "read_rows", "load_dataset_file"]


class DataError(ValueError):
    """A data file or one of its rows is malformed.

    Attributes:
        path: the file.
        row: 1-based row (JSONL: line number), or None for the whole file.
        field: the field at fault, or None.
    """

    def __init__(self, path: str | Path, row: int | None, field: str | None, message: str):
        self.path, self.row, self.field = str(path), row, field
        where = str(path) + (f", row {row}" if row is not None else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")


@dataclass
class FileReport:
    """What one file contributed.

    Attributes:
        path: the file.
        rows: rows read.
        too_long: prompts dropped for exceeding ``max_prompt_tokens``.
    """

    path: str
    rows: int = 0
    too_long: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _surrogate_field(value: Any, prefix: str = "") -> str | None:
    """Dotted path of the first string in ``value`` that holds undecodable bytes (as surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return prefix or "<row>"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            hit = _surrogate_field(v, f"{prefix}.{k}" if prefix else str(k))
            if hit:
                return hit
    if isinstance(value, list):
        for i, v in enumerate(value):
            hit = _surrogate_field(v, f"{prefix}[{i}]")
            if hit:
                return hit
    return None


def _read_jsonl(path: Path, limit: int) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        count = 0
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark (editors, exports)
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                bad_utf8 = False
            except UnicodeDecodeError:
                text, bad_utf8 = raw.decode("utf-8", errors="surrogateescape"), True
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(path, lineno, None, f"not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, lineno, None, f"expected a JSON object, got {type(row).__name__}")
            if bad_utf8:
                where = _surrogate_field(row)
                raise DataError(path, lineno, where, "contains bytes that are not valid UTF-8")
            yield lineno, row
            count += 1
            if limit and count >= limit:
                return


def _read_parquet(path: Path, limit: int) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(path, None, None, f"not a readable Parquet file ({err})") from None
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            for key, value in row.items():  # binary columns arrive as bytes: must be UTF-8 text
                if isinstance(value, (bytes, bytearray)):
                    try:
                        row[key] = value.decode("utf-8")
                    except UnicodeDecodeError:
                        raise DataError(path, row_no, key, "contains bytes that are not valid UTF-8") from None
            yield row_no, row
            if limit and row_no >= limit:
                return


def read_rows(path: str | Path, *, limit: int = 0) -> Iterator[tuple[int, dict]]:
    """``(row_number, row_dict)`` of a ``.jsonl``/``.json`` or ``.parquet`` file, 1-based rows.

    Raises:
        DataError: the file is missing or unreadable, or a row is not a UTF-8 JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file does not exist")
    if path.suffix == ".parquet":
        return _read_parquet(path, limit)
    return _read_jsonl(path, limit)


def _get(row: dict, dotted: str, path: Path, row_no: int) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(path, row_no, dotted, f"missing field (row has: {', '.join(sorted(row))})")
        value = value[part]
    if value is None:
        raise DataError(path, row_no, dotted, "missing field (null)")
    return value


def _question(value: Any, path: Path, row_no: int, name: str) -> str:
    """The question of a prompt field: a string as is, or a chat-message list's last user message."""
    if isinstance(value, (list, tuple)):
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise DataError(path, row_no, name, "expected a chat-message list with a 'user' message "
                            f"(roles: {[m.get('role') if isinstance(m, dict) else type(m).__name__ for m in value]})")
        value = users[-1].get("content")
        name = f"{name}[-1 user].content"
    if not isinstance(value, str):
        raise DataError(path, row_no, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, row_no, name, "empty prompt")
    return value


def _reference(raw: Any, how: str, path: Path, row_no: int, name: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise DataError(path, row_no, name, f"expected a string or number, got {type(raw).__name__}")
    if isinstance(raw, float) and not np.isfinite(raw):
        raise DataError(path, row_no, name, f"expected a finite number, got {raw!r}")
    text = str(raw).strip()
    if how == "gsm8k":
        final = extract_gsm8k_answer(text)
        if final is None:
            raise DataError(path, row_no, name, "expected a GSM8K answer ending in '#### <number>'")
        return final
    if how == "boxed":
        boxed = last_boxed(text)
        if not boxed:
            raise DataError(path, row_no, name, "expected a solution containing \\boxed{<answer>}")
        return boxed
    if not text:
        raise DataError(path, row_no, name, "empty answer")
    return text


def load_dataset_file(
    spec: DatasetFile,
    tokenizer: TextTokenizer,
    *,
    prompt_template: str = "{prompt}",
    max_prompt_tokens: int = 0,
    split: str = "",
) -> tuple[list[PromptRecord], FileReport]:
    """Read one file into :class:`PromptRecord` s (not yet de-duplicated).

    The prompt id hashes the question and reference answer; ``token_ids`` are of
    ``prompt_template.format(prompt=question)`` through ``tokenizer.encode_prompt`` (chat template).

    Raises:
        DataError: naming file, row and field of the first malformed row.
    """
    path = Path(spec.path)
    prompt_field, answer_field, how = spec.fields
    source = spec.source or path.stem
    report = FileReport(str(path))
    out: list[PromptRecord] = []
    for row_no, row in read_rows(path, limit=spec.limit):
        report.rows += 1
        question = _question(_get(row, prompt_field, path, row_no), path, row_no, prompt_field)
        raw_answer = _get(row, answer_field, path, row_no)
        if spec.format == "verl" and isinstance(raw_answer, (list, tuple)) and len(raw_answer) == 1:
            raw_answer = raw_answer[0]  # verl's own examples store ``ground_truth: ["72"]``
        answer = _reference(raw_answer, how, path, row_no, answer_field)
        ids = tokenizer.encode_prompt(prompt_template.format(prompt=question))
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            report.too_long += 1
            continue
        meta = {"file": str(path), "row": row_no}
        if split:
            meta["split"] = split
        row_source = source
        if spec.format == "verl" and not spec.source and isinstance(row.get("data_source"), str) and row["data_source"]:
            row_source = row["data_source"]  # verl names each row's dataset (one file often mixes several)
        out.append(PromptRecord(prompt_id=prompt_id(question, answer), token_ids=np.asarray(ids, dtype=np.int32),
                                answer=answer, source=row_source, text=question, meta=meta))
    if report.rows == 0:
        raise DataError(path, None, None, "file has no rows")
    return out, report
