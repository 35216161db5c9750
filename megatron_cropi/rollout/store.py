"""The trajectory store: per prompt, K responses with token ids, behaviour log-probs and rewards.

Written once by the behaviour policy's rollout, read by POPI at every stage. On disk, a directory::

    header.json                what the trajectories are: schema version, sampling parameters (with the
                               log-prob semantics), tokenizer and model identity, policy version, pool
                               hash and size, created-by (:mod:`.store_header`)
    manifest.json              the committed parts, each with rows, bytes, blake2b checksum, id range
    parts/part-000000.arrow    Arrow IPC files, one row per prompt (columns below)
    index/*.npy                once complete: the sorted ids, their part and row, pass rates and sources,
                               read memory-mapped (:mod:`.store_index`)

Writes are atomic and append-only: a part is written to a temporary name, fsynced and renamed, then
the manifest (the commit point) is replaced the same way. A run killed at any moment leaves a store
whose manifest lists only complete parts; reopening it deletes stray files, and the rollout resumes
at the first prompt not yet committed. On reopen every part is checked against its recorded size and
checksum, so a truncated or corrupted part is an error naming the file; a header that does not match
the run (other sampling parameters, pool, tokenizer, model, policy version) is an error naming the
field and both values.

Columns: ``prompt_id, source, text, answer, meta`` (JSON), ``prompt_token_ids: list<int32>``,
``response_token_ids: list<list<int32>>``, ``response_logprobs: list<list<float32>>``,
``finished: list<bool>``, ``rewards: list<float32>``, ``policy_version: int64``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megatron_cropi.records import PromptRecord, Response, RolloutGroup
from megatron_cropi.rollout.row_index import CodedStrings, RowIndex
from megatron_cropi.rollout.store_index import load_store_index, write_store_index
from megatron_cropi.rollout.store_header import SCHEMA_VERSION, StoreError, StoreHeader, read_header, read_store_json
from megatron_cropi.utils.atomic import atomic_write_bytes

__all__ = ["StoreError", "StoreHeader", "TrajectoryStore", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)

OPEN_PARTS = 64  # parts kept open for reading (see _table)


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("prompt_id", pa.string()), ("source", pa.string()), ("text", pa.string()), ("answer", pa.string()),
        ("meta", pa.string()), ("prompt_token_ids", pa.list_(pa.int32())),
        ("response_token_ids", pa.list_(pa.list_(pa.int32()))), ("response_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("finished", pa.list_(pa.bool_())), ("rewards", pa.list_(pa.float32())), ("policy_version", pa.int64()),
    ])


def _split_lists(list_array) -> list[np.ndarray]:
    """A ``ListArray`` (one row's K responses) → K numpy arrays, zero-copy where Arrow allows."""
    offsets = list_array.offsets.to_numpy()
    flat = list_array.flatten().to_numpy(zero_copy_only=False)
    base = offsets[0]
    return [flat[offsets[i] - base: offsets[i + 1] - base] for i in range(len(offsets) - 1)]


class TrajectoryStore:
    """A trajectory store directory. Use :meth:`open_for_append` to write (and resume), :meth:`open` to read."""

    def __init__(self, path: Path, header: StoreHeader, manifest: dict, *, writable: bool):
        self.path = path
        self.header = header
        self._manifest = manifest
        self._writable = writable
        self._tables: OrderedDict[str, Any] = OrderedDict()  # the parts open now, least recently used first
        # a complete store's index and selection columns, memory-mapped from its index files (.store_index)
        entry = manifest.get("index") if manifest.get("complete") else None
        mapped = load_store_index(path, entry, [p["name"] for p in manifest["parts"]]) if entry else None
        self._columns: tuple[np.ndarray, CodedStrings] | None = mapped[1:3] if mapped else None
        self._summary: dict[str, np.ndarray] | None = mapped[3] if mapped else None
        if mapped:
            self._index = mapped[0]
        else:
            self._index = RowIndex()  # ~48 bytes a prompt (32-character ids), where a dict held ~200
            self._index.add_parts((part["name"], self._table(part["name"]).column("prompt_id").to_pylist())
                                  for part in manifest["parts"])  # one part's ids as strings at a time

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open_for_append(cls, path: str | Path, header: StoreHeader, *, repair: bool = False) -> "TrajectoryStore":
        """Create the store, or reopen it to resume (header must match, parts must verify).

        Args:
            repair: drop corrupt parts from the manifest instead of raising (their prompts are
                rolled out again).
        """
        path = Path(path)
        (path / "parts").mkdir(parents=True, exist_ok=True)
        if not (path / "header.json").exists():
            if (path / "manifest.json").exists():
                raise StoreError(f"{path}: manifest.json exists but header.json is missing; not a complete store")
            atomic_write_bytes(path / "header.json", json.dumps(header.to_dict(), indent=2, sort_keys=True).encode())
            atomic_write_bytes(path / "manifest.json", json.dumps({"parts": [], "complete": False}).encode())
        store = cls._load(path, writable=True, repair=repair)
        bad = store.header.mismatches(header)
        if bad:
            raise StoreError(f"{path}: the existing trajectory store does not match this run: " + "; ".join(bad)
                             + ". Use another store directory, or delete this one to roll out again.")
        store._remove_strays()
        return store

    @classmethod
    def open(cls, path: str | Path, *, expect: StoreHeader | None = None, verify: bool = True) -> "TrajectoryStore":
        """Open for reading; ``expect`` (optional) must match the header.

        Args:
            verify: check every part's size and checksum (reads the whole store). Scale-out scoring
                verifies on one rank and opens unverified on the others, so that 1,000 ranks do not
                each read a million-prompt store in full.
        """
        store = cls._load(Path(path), writable=False, repair=False, verify=verify)
        if expect is not None and store.header.mismatches(expect):
            raise StoreError(f"{path}: trajectory store does not match: " + "; ".join(store.header.mismatches(expect)))
        return store

    @classmethod
    def _load(cls, path: Path, *, writable: bool, repair: bool, verify: bool = True) -> "TrajectoryStore":
        header = read_header(path)
        manifest = read_store_json(path / "manifest.json", "manifest")
        good = []
        for part in manifest["parts"]:
            problem = cls._verify_part(path / "parts" / part["name"], part) if verify else None
            if problem and not repair:
                raise StoreError(f"{path / 'parts' / part['name']}: {problem}. The part is truncated or corrupt: "
                                 "restore it, or reopen with repair=True (`cropi rollout --repair`) to drop it and "
                                 "roll its prompts out again.")
            if problem:
                log.warning("trajectory store: dropping %s (%s); its %d prompts will be rolled out again",
                            part["name"], problem, part["rows"])
                continue
            good.append(part)
        if len(good) != len(manifest["parts"]):
            next_part = 1 + max((int(p["name"][5:11]) for p in manifest["parts"]), default=-1)
            manifest = dict(manifest, parts=good, complete=False, next_part=next_part)
            manifest.pop("index", None)
            atomic_write_bytes(path / "manifest.json", json.dumps(manifest, indent=1).encode())
        return cls(path, header, manifest, writable=writable)

    @staticmethod
    def _verify_part(file: Path, part: dict) -> str | None:
        if not file.is_file():
            return "missing"
        size = file.stat().st_size
        if size != part["bytes"]:
            return f"size {size} bytes, manifest.json recorded {part['bytes']}"
        digest = _digest(file)
        if digest != part["blake2b"]:
            return f"checksum {digest} does not match the recorded {part['blake2b']}"
        return None

    def _remove_strays(self) -> None:
        listed = {p["name"] for p in self._manifest["parts"]}
        for f in (self.path / "parts").iterdir():
            if f.name not in listed:  # a part renamed before a kill but never committed, or a temp file
                log.info("trajectory store: removing uncommitted %s", f.name)
                f.unlink()

    # -- writing ---------------------------------------------------------------------------------
    def append(self, groups: Sequence[RolloutGroup]) -> None:
        """Commit ``groups`` as one new part (atomic: after a kill it is either fully there or absent)."""
        import pyarrow as pa

        if not self._writable:
            raise StoreError(f"{self.path}: opened read-only")
        if not groups:
            return
        seen = [g.prompt_id for g in groups if g.prompt_id in self]
        if seen or len({g.prompt_id for g in groups}) != len(groups):
            raise StoreError(f"{self.path}: prompts already stored or repeated in one append: {seen[:3]}")
        for g in groups:
            if len(g.rewards) != len(g.responses):
                raise StoreError(f"prompt {g.prompt_id}: {len(g.responses)} responses but {len(g.rewards)} rewards")
        cols = {
            "prompt_id": [g.prompt_id for g in groups], "source": [g.prompt.source for g in groups],
            "text": [g.prompt.text for g in groups], "answer": [g.prompt.answer for g in groups],
            "meta": [json.dumps(g.prompt.meta, sort_keys=True, default=str) for g in groups],
            "prompt_token_ids": [np.asarray(g.prompt.token_ids, dtype=np.int32) for g in groups],
            "response_token_ids": [[np.asarray(r.token_ids, dtype=np.int32) for r in g.responses] for g in groups],
            "response_logprobs": [[np.asarray(r.logprobs, dtype=np.float32) for r in g.responses] for g in groups],
            "finished": [[bool(r.finished) for r in g.responses] for g in groups],
            "rewards": [np.asarray(g.rewards, dtype=np.float32) for g in groups],
            "policy_version": [int(g.policy_version) for g in groups],
        }
        table = pa.table(cols, schema=_schema())
        # never reuse the number of a part dropped by a repair: its stale file may still be read by someone
        number = 1 + max((int(p["name"][5:11]) for p in self._manifest["parts"]), default=-1)
        number = max(number, self._manifest.get("next_part", 0))
        name = f"part-{number:06d}.arrow"
        final = self.path / "parts" / name
        tmp = final.with_name(f".{name}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        ids = sorted(cols["prompt_id"])
        part = {"name": name, "rows": len(groups), "bytes": final.stat().st_size, "blake2b": _digest(final),
                "first_id": ids[0], "last_id": ids[-1]}
        manifest = dict(self._manifest, parts=self._manifest["parts"] + [part], next_part=number + 1)
        manifest.pop("index", None)  # the index files describe the parts before this one
        atomic_write_bytes(self.path / "manifest.json", json.dumps(manifest, indent=1).encode())  # the commit point
        self._manifest = manifest
        self._index.add_part(name, cols["prompt_id"])
        self._columns = self._summary = None

    def mark_complete(self) -> None:
        """Record that every prompt of the pool is stored (checked against the header's ``num_prompts``)."""
        if len(self) != self.header.num_prompts:
            raise StoreError(f"{self.path}: {len(self)} of {self.header.num_prompts} prompts stored; not complete")
        rates, sources = self.pass_rates_and_sources()
        # the index files first, then the manifest that commits them with the completion
        entry = write_store_index(self.path, self._index, rates, sources, self.row_summary())
        self._manifest = dict(self._manifest, complete=True, index=entry)
        atomic_write_bytes(self.path / "manifest.json", json.dumps(self._manifest, indent=1).encode())

    # -- reading ---------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self._manifest.get("complete"))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, prompt_id: str) -> bool:
        return self._index.position(prompt_id) >= 0

    def done_ids(self) -> set[str]:
        """Ids of the prompts already stored."""
        return set(self._index.prompt_ids())

    def prompt_ids(self) -> list[str]:
        """Stored prompt ids in prompt-id order (the order :meth:`iter_groups` reads)."""
        return self._index.prompt_ids()

    def prompt_id_view(self) -> Sequence[str]:
        """:meth:`prompt_ids` without building the list: each id decoded when read (scale-out scoring on
        every rank of a large pool)."""
        return self._index.view()

    def _table(self, name: str):
        import pyarrow as pa

        if name in self._tables:
            self._tables.move_to_end(name)
            return self._tables[name]
        # memory-mapped and zero-copy, but each open part keeps ~14 KB of Arrow metadata in private memory:
        # keep the most recently read ones only (a scoring unit reads a few parts; a pool has thousands)
        source = pa.memory_map(str(self.path / "parts" / name), "r")
        self._tables[name] = table = pa.ipc.open_file(source).read_all().combine_chunks()
        while len(self._tables) > OPEN_PARTS:
            self._tables.popitem(last=False)
        return table

    def row_summary(self, max_responses: int = 0) -> dict[str, np.ndarray]:
        """Per-row scalars in prompt-id order, read column-wise (no :class:`RolloutGroup` is built): what
        a scoring plan needs of every row while the rollouts themselves stay on disk.

        Args:
            max_responses: count only each row's first responses (0 = all), as scoring with
                ``scoring.max_responses_per_prompt`` does.

        Returns:
            ``longest [N]`` int64 (prompt + longest response), ``tokens [N]`` int64 (Σ_k prompt +
            response_k), ``zero_variance [N]`` bool (all rewards equal, or none); 17 bytes a row,
            memory-mapped from the index files (read-only) for a complete store and ``max_responses`` 0.
        """
        import pyarrow.compute as pc

        if self._summary is not None and not max_responses:  # memory-mapped from the index files, read-only
            return self._summary
        n = len(self._index)
        longest, tokens, zero_var = np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n, bool)
        for part in self._manifest["parts"]:
            t = self._table(part["name"])
            positions, rows = self._index.positions_of_part(part["name"])
            plen = pc.list_value_length(t.column("prompt_token_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
            responses = t.column("response_token_ids").combine_chunks()
            rlen = pc.list_value_length(responses.flatten()).to_numpy(zero_copy_only=False).astype(np.int64)
            per_row = pc.list_value_length(responses).to_numpy(zero_copy_only=False).astype(np.int64)
            rvals = t.column("rewards").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            # per response: its row and its number within the row; only each row's first k_eff count
            owner = np.repeat(np.arange(per_row.size), per_row)
            number = np.arange(owner.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)
            k_eff = np.minimum(per_row, max_responses) if max_responses else per_row
            kept = number < k_eff[owner]
            owner, lens, rew = owner[kept], rlen[kept], rvals[kept].astype(np.float64)
            part_longest = np.zeros(per_row.size, np.int64)
            np.maximum.at(part_longest, owner, lens)
            lo, hi = np.full(per_row.size, np.inf), np.full(per_row.size, -np.inf)
            np.minimum.at(lo, owner, rew)
            np.maximum.at(hi, owner, rew)
            longest[positions] = (plen + part_longest)[rows]
            tokens[positions] = (k_eff * plen + np.bincount(owner, lens, minlength=per_row.size).astype(np.int64))[rows]
            zero_var[positions] = ((k_eff == 0) | (lo == hi))[rows]
        return {"longest": longest, "tokens": tokens, "zero_variance": zero_var}

    def pass_rates_and_sources(self) -> tuple[np.ndarray, CodedStrings]:
        """``[N]`` pass rates (share of rewards > 0.5, 0 for none) and sources in prompt-id order, read
        column-wise: what selection needs of every row, without building the groups (sources as
        int32 codes: a pool has few)."""
        import pyarrow.compute as pc

        if self._columns is not None:  # memory-mapped from the index files, read-only
            return self._columns
        n = len(self._index)
        rates, codes, names = np.zeros(n), np.zeros(n, np.int32), {}
        for part in self._manifest["parts"]:
            t = self._table(part["name"])
            positions, rows = self._index.positions_of_part(part["name"])
            rewards = t.column("rewards").combine_chunks()
            counts = pc.list_value_length(rewards).to_numpy(zero_copy_only=False).astype(np.int64)
            hits = (rewards.flatten().to_numpy(zero_copy_only=False) > 0.5).astype(np.float64)
            ends = np.cumsum(counts)
            sums = np.diff(np.concatenate([[0.0], np.cumsum(hits)])[np.concatenate([[0], ends])])
            rates[positions] = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)[rows]
            encoded = t.column("source").combine_chunks().dictionary_encode()
            mapping = np.array([names.setdefault(v, len(names)) for v in encoded.dictionary.to_pylist()] or [0],
                               dtype=np.int32)
            codes[positions] = mapping[encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)][rows]
        return rates, CodedStrings(codes, list(names))

    def get(self, prompt_id: str) -> RolloutGroup:
        """The stored group of ``prompt_id`` (KeyError if absent)."""
        position = self._index.position(prompt_id)
        if position < 0:
            raise KeyError(f"prompt {prompt_id!r} is not in the trajectory store {self.path}")
        return self.group_at(position)

    def group_at(self, position: int) -> RolloutGroup:
        """The stored group at ``position`` in prompt-id order (row ``position`` of a feature store of this
        store): no id is looked up."""
        prompt_id = self._index.ids[position].decode("utf-8")
        name, row = self._index.locate(position)
        t = self._table(name).slice(row, 1)

        def col(key):
            return t.column(key).chunk(0)

        prompt = PromptRecord(
            prompt_id=prompt_id, token_ids=col("prompt_token_ids")[0].values.to_numpy(zero_copy_only=False),
            answer=col("answer")[0].as_py(), source=col("source")[0].as_py(), text=col("text")[0].as_py(),
            meta=json.loads(col("meta")[0].as_py()),
        )
        tokens = _split_lists(col("response_token_ids")[0].values)
        logprobs = _split_lists(col("response_logprobs")[0].values)
        finished = col("finished")[0].as_py()
        responses = tuple(Response(token_ids=t_, logprobs=l_, finished=f_)
                          for t_, l_, f_ in zip(tokens, logprobs, finished))
        rewards = col("rewards")[0].values.to_numpy(zero_copy_only=False).astype(np.float32)
        return RolloutGroup(prompt=prompt, responses=responses, rewards=rewards,
                            policy_version=int(col("policy_version")[0].as_py()))

    def iter_groups(self, prompt_ids: Sequence[str] | None = None) -> Iterator[RolloutGroup]:
        """Groups in prompt-id order (or in the order of ``prompt_ids``)."""
        for pid in (self.prompt_ids() if prompt_ids is None else prompt_ids):
            yield self.get(pid)
