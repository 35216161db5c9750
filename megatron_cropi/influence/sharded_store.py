"""A feature store written by many data-parallel replicas at once: one shard per writer, one file per unit.

Scale-out scoring (:mod:`megatron_cropi.influence.scale_out`) cuts a pool into *units* (one schedule
call each: the same plan whatever the number of replicas) that replicas take from a shared queue. The
replica that scores a unit writes it to its own shard; nothing is gathered to one rank. On disk::

    header.json                      the :class:`~megatron_cropi.influence.feature_store.FeatureHeader`
                                     (all N rows) plus ``"sharded": true``
    excluded.npy                     [E] int64 rows without a gradient (all rewards equal, or left out by
                                     the caller), written once before any unit
    plan_units.npy, plan_rows.npy    the units (:class:`UnitPlan`), written once with ``excluded.npy``
    shards/w{writer:05d}/unit-{u:07d}.npz
                                     rows [R] int64, stored features [R, k] in the header's dtype
                                     (float16: with the rows' fp32 scales), status [R] uint8

A unit file is written to a temporary name and renamed, so it is there whole or not at all: the units on
disk are the work done, and a resumed run (any number of replicas) scores only the others. A row is in
at most one unit; a row in no unit and not excluded is pending.

Reading does not need one rank to hold ``[N, k]``: :meth:`ShardedFeatureStore.unit_files` lists the
units, and each reader decodes the ones it is given (:func:`read_unit`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_cropi.influence.feature_store import (
    DONE,
    EXCLUDED,
    PENDING,
    FeatureHeader,
    FeatureStoreMismatch,
    decode_features,
    encode_features,
)
from megatron_cropi.utils.atomic import atomic_write_bytes, atomic_write_json

__all__ = ["ShardedFeatureStore", "UnitPlan", "UnitRows", "is_sharded_store", "load_feature_store", "read_unit"]

_UNIT = re.compile(r"^unit-(\d{7})\.npz$")


@dataclasses.dataclass(frozen=True)
class UnitRows:
    """One unit read back: ``rows [R]`` int64, ``features [R, k]`` float32 (decoded), ``status [R]`` uint8."""

    unit: int
    rows: np.ndarray
    features: np.ndarray
    status: np.ndarray


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """What each unit scores: unit ``u`` takes store rows ``rows[start_u:end_u]`` (in packing order) in
    micro-batches of ``prompts_per_microbatch_u`` prompts padded to ``seq_length_u``; ``tokens_u`` is
    their real tokens. ``units [U, 5]`` int64 columns (start, end, seq_length, prompts_per_microbatch,
    tokens), ``rows [R]`` int64. Written by one rank, read memory-mapped by all: no rank holds a per-row
    plan in private memory."""

    units: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.units.shape[0])

    def unit(self, u: int) -> tuple[np.ndarray, int, int, int]:
        """``(rows [n] int64, seq_length, prompts_per_microbatch, tokens)`` of unit ``u``."""
        start, end, seq, ppm, tokens = (int(v) for v in self.units[u])
        return np.asarray(self.rows[start:end], dtype=np.int64), seq, ppm, tokens

    def save(self, path: Path) -> None:
        for name, array in (("plan_rows", self.rows), ("plan_units", self.units)):  # units last: the marker
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(array, dtype=np.int64))
            atomic_write_bytes(path / f"{name}.npy", buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "UnitPlan":
        return cls(np.load(path / "plan_units.npy", mmap_mode="r"), np.load(path / "plan_rows.npy", mmap_mode="r"))


def is_sharded_store(path: str | Path) -> bool:
    """Whether ``path`` holds a sharded feature store (its header says so)."""
    header = Path(path) / "header.json"
    if not header.is_file():
        return False
    try:
        return bool(json.loads(header.read_text()).get("sharded"))
    except (OSError, json.JSONDecodeError):
        return False


def load_feature_store(path: str | Path):
    """The feature store at ``path`` for reading: a :class:`ShardedFeatureStore` or a plain
    :class:`~megatron_cropi.influence.feature_store.FeatureStore` (both have ``header``, ``statuses``,
    ``counts``, ``read_rows``, ``matrix``)."""
    from megatron_cropi.influence.feature_store import FeatureStore

    return ShardedFeatureStore.load(path) if is_sharded_store(path) else FeatureStore.load(path)


def read_unit(path: Path, dtype: str) -> UnitRows:
    """Decode one unit file (see the module docstring) to float32."""
    with np.load(path) as z:
        rows, stored, status = z["rows"], z["features"], z["status"]
        scales = z["scales"] if "scales" in z.files else None
    match = _UNIT.match(path.name)
    return UnitRows(int(match.group(1)) if match else -1, rows.astype(np.int64),
                    decode_features(stored, dtype, scales), status.astype(np.uint8))


class ShardedFeatureStore:
    """See the module docstring. :meth:`open` creates or validates; :meth:`writer` gives a replica its shard."""

    def __init__(self, path: Path, header: FeatureHeader, plan_hash: str = ""):
        self.path, self.header, self.plan_hash = path, header, plan_hash

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, header: FeatureHeader, excluded: np.ndarray | None = None,
             plan_hash: str = "", plan: UnitPlan | None = None) -> "ShardedFeatureStore":
        """Create the store (recording ``excluded`` rows, the unit ``plan`` and its hash) or reopen it; a
        different header or plan is an error naming the field and both values. Call on one rank, then
        let the others :meth:`load` it."""
        path = Path(path)
        if not (path / "header.json").exists():
            (path / "shards").mkdir(parents=True, exist_ok=True)
            if plan is not None:
                plan.save(path)
            rows = np.asarray(excluded if excluded is not None else [], dtype=np.int64)
            buf = io.BytesIO()
            np.save(buf, rows)
            atomic_write_bytes(path / "excluded.npy", buf.getvalue())
            atomic_write_json(path / "header.json", {**dataclasses.asdict(header), "sharded": True,
                                                     "plan_hash": plan_hash})
        store = cls.load(path)
        if store.plan_hash != plan_hash:  # unit u must hold the same rows, or resume would mix them
            raise FeatureStoreMismatch(f"feature store {path} was written with plan_hash={store.plan_hash!r} (its "
                                       f"units' rows), but this run has plan_hash={plan_hash!r}: the scoring options "
                                       "that cut the pool into units changed; use a new output directory or delete "
                                       "the old store")
        for f in dataclasses.fields(FeatureHeader):
            old, new = getattr(store.header, f.name), getattr(header, f.name)
            if old != new:
                raise FeatureStoreMismatch(f"feature store {path} was written with {f.name}={old!r}, but this run "
                                           f"has {f.name}={new!r}; use a new output directory or delete the old store")
        if plan is not None and not (path / "plan_units.npy").exists():  # a store begun before plans were kept
            plan.save(path)
        return store

    @classmethod
    def load(cls, path: str | Path) -> "ShardedFeatureStore":
        """Open an existing sharded store for reading, whatever its header."""
        path = Path(path)
        if not is_sharded_store(path):
            raise FileNotFoundError(f"no sharded feature store at {path} (header.json missing or not sharded)")
        raw = json.loads((path / "header.json").read_text())
        raw.pop("sharded")
        plan_hash = raw.pop("plan_hash", "")
        try:
            header = FeatureHeader(**raw)
        except (TypeError, ValueError) as err:
            raise FeatureStoreMismatch(f"{path / 'header.json'} is not a feature-store header: {err}") from None
        return cls(path, header, plan_hash)

    # -- writing -------------------------------------------------------------------------------------
    def write_unit(self, writer: int, unit: int, rows, features, status) -> None:
        """Commit unit ``unit`` (rows ``[R]``, float32 ``features [R, k]``, ``status [R]``) to shard ``writer``.

        Raises:
            ValueError: shapes that do not match the header.
        """
        rows = np.asarray(rows, dtype=np.int64)
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (rows.size, self.header.k) or np.asarray(status).shape != (rows.size,):
            raise ValueError(f"unit {unit}: features {features.shape} and status {np.asarray(status).shape} for "
                             f"{rows.size} rows, expected ({rows.size}, {self.header.k}) and ({rows.size},)")
        if rows.size and (rows.min() < 0 or rows.max() >= self.header.num_rows):
            raise IndexError(f"unit {unit}: rows outside [0, {self.header.num_rows})")
        stored, scales = encode_features(features, self.header.dtype)
        arrays = {"rows": rows, "features": stored, "status": np.asarray(status, dtype=np.uint8)}
        if scales is not None:
            arrays["scales"] = scales
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.path / "shards" / f"w{writer:05d}" / f"unit-{unit:07d}.npz", buf.getvalue())

    # -- reading -------------------------------------------------------------------------------------
    def unit_files(self) -> list[Path]:
        """Every committed unit file, sorted by unit number (a unit written twice is listed once)."""
        seen: dict[int, Path] = {}
        shards = self.path / "shards"
        for shard in sorted(d for d in shards.iterdir() if d.is_dir()) if shards.is_dir() else []:
            for f in sorted(os.listdir(shard)):
                m = _UNIT.match(f)
                if m:
                    seen.setdefault(int(m.group(1)), shard / f)
        return [seen[u] for u in sorted(seen)]

    def done_units(self) -> set[int]:
        """Numbers of the committed units."""
        return {int(_UNIT.match(f.name).group(1)) for f in self.unit_files()}

    def excluded_rows(self) -> np.ndarray:
        return np.load(self.path / "excluded.npy", mmap_mode="r")

    def unit_plan(self) -> UnitPlan:
        """The units :meth:`open` recorded, memory-mapped."""
        return UnitPlan.load(self.path)

    def iter_units(self, files: list[Path] | None = None) -> Iterator[UnitRows]:
        """The units of ``files`` (default all), decoded to float32."""
        for f in self.unit_files() if files is None else files:
            yield read_unit(f, self.header.dtype)

    def statuses(self) -> np.ndarray:
        """``[N]`` uint8 row states (pending, done, excluded, flagged), read from every unit's status only."""
        out = np.full(self.header.num_rows, PENDING, np.uint8)
        out[self.excluded_rows()] = EXCLUDED
        for f in self.unit_files():
            with np.load(f) as z:
                out[z["rows"]] = z["status"]
        return out

    def counts(self) -> dict[str, int]:
        st = self.statuses()
        return {name: int((st == code).sum()) for name, code in
                (("pending", PENDING), ("done", DONE), ("excluded", EXCLUDED), ("flagged", 3))}

    @property
    def complete(self) -> bool:
        return not (self.statuses() == PENDING).any()

    def read_rows(self, rows) -> np.ndarray:
        """float32 ``[R, k]`` features of ``rows`` (zeros for rows without a gradient): reads every unit
        that holds one of them. For a few rows (the probe), not for the pool."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((rows.size, self.header.k), np.float32)
        where = {int(r): i for i, r in enumerate(rows.tolist())}
        for unit in self.iter_units():
            for j, r in enumerate(unit.rows.tolist()):
                if r in where:
                    out[where[r]] = unit.features[j]
        return out

    def matrix(self) -> np.ndarray:
        """``[N, k]`` float32 features: the whole store on one rank. Tests and small pools only."""
        return self.read_rows(np.arange(self.header.num_rows))
