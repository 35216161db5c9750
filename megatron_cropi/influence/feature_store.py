"""The feature store: projected per-prompt gradients ``[N, k]`` on disk, resumable row by row.

A directory with

* ``header.json``: what the features are (schema, rows, k, seed, projector, parameter-set hash,
  checkpoint step, prompt-id hash). Reopening with a different header is an error naming the field
  and both values: features of another projector or checkpoint must never mix.
* ``features.f32``: ``[N, k]`` float32 memory map.
* ``status.u8``: ``[N]`` row states: 0 pending, 1 done, 2 excluded (all rewards equal: zero
  gradient), 3 flagged (NaN/inf). A row's features are flushed *before* its status, so a killed run
  never marks a row done without its data; pending rows are recomputed on resume.

The directory is created under a temporary name and renamed into place once initialised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from megatron_cropi.utils.atomic import atomic_write_json, fsync_dir

__all__ = ["FeatureHeader", "FeatureStore", "FeatureStoreMismatch", "PENDING", "DONE", "EXCLUDED", "FLAGGED",
           "hash_strings"]

PENDING, DONE, EXCLUDED, FLAGGED = 0, 1, 2, 3
SCHEMA_VERSION = 1


def hash_strings(items: Iterable[str]) -> str:
    """Order-sensitive content hash of a sequence of strings (prompt ids, parameter names)."""
    h = hashlib.blake2b(digest_size=16)
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


class FeatureStoreMismatch(ValueError):
    """An existing feature store was written for something else than what is asked now."""


@dataclass(frozen=True)
class FeatureHeader:
    """Identity of a feature store's contents."""

    num_rows: int
    k: int
    seed: int
    projector: str
    param_set_hash: str
    checkpoint_step: int
    prompt_id_hash: str
    schema_version: int = SCHEMA_VERSION


class FeatureStore:
    """Memory-mapped ``[N, k]`` features with a per-row status map; see the module docstring.

    Use :meth:`open` (creates or validates), then :meth:`write_rows` and :meth:`pending_rows`.
    """

    def __init__(self, path: Path, header: FeatureHeader, features: np.memmap, status: np.memmap):
        self.path, self.header, self.features, self.status = path, header, features, status

    @classmethod
    def open(cls, path: str | Path, header: FeatureHeader, *, create: bool = True) -> "FeatureStore":
        """Open the store at ``path`` for ``header``, creating it if absent (and ``create``).

        Raises:
            FeatureStoreMismatch: the existing store's header differs (names field and both values).
            FileNotFoundError: absent and not ``create``.
        """
        path = Path(path)
        if not (path / "header.json").exists():
            if not create:
                raise FileNotFoundError(f"no feature store at {path}")
            cls._create(path, header)
        existing = cls._read_header(path)
        for f in dataclasses.fields(FeatureHeader):
            old, new = getattr(existing, f.name), getattr(header, f.name)
            if old != new:
                raise FeatureStoreMismatch(
                    f"feature store {path} was written with {f.name}={old!r}, but this run has "
                    f"{f.name}={new!r}; use a new output directory or delete the old store"
                )
        return cls._map(path, existing)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStore":
        """Open an existing store read-only, whatever its header."""
        path = Path(path)
        if not (path / "header.json").exists():
            raise FileNotFoundError(f"no feature store at {path} (header.json missing)")
        return cls._map(path, cls._read_header(path), mode="r")

    @staticmethod
    def _read_header(path: Path) -> FeatureHeader:
        try:
            data = json.loads((path / "header.json").read_text())
            return FeatureHeader(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise FeatureStoreMismatch(f"{path / 'header.json'} is not a feature-store header: {err}") from None

    @classmethod
    def _create(cls, path: Path, header: FeatureHeader) -> None:
        tmp = path.with_name(f".{path.name}.creating")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        np.memmap(tmp / "features.f32", dtype=np.float32, mode="w+", shape=(max(header.num_rows, 1), header.k)).flush()
        np.memmap(tmp / "status.u8", dtype=np.uint8, mode="w+", shape=(max(header.num_rows, 1),)).flush()
        atomic_write_json(tmp / "header.json", dataclasses.asdict(header))
        tmp.rename(path)
        fsync_dir(path.parent)

    @classmethod
    def _map(cls, path: Path, header: FeatureHeader, mode: str = "r+") -> "FeatureStore":
        n = max(header.num_rows, 1)
        expected = {"features.f32": n * header.k * 4, "status.u8": n}
        for name, size in expected.items():
            actual = (path / name).stat().st_size if (path / name).exists() else -1
            if actual != size:
                raise FeatureStoreMismatch(f"{path / name} has {actual} bytes, expected {size} for "
                                           f"{header.num_rows} rows × k={header.k}: the store is damaged")
        feats = np.memmap(path / "features.f32", dtype=np.float32, mode=mode, shape=(n, header.k))
        status = np.memmap(path / "status.u8", dtype=np.uint8, mode=mode, shape=(n,))
        return cls(path, header, feats, status)

    # -- rows --------------------------------------------------------------------------------------
    def write_rows(self, rows, features, status) -> None:
        """Write ``features`` ``[R, k]`` and ``status`` ``[R]`` at ``rows``; data first, then status."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (rows.size, self.header.k):
            raise ValueError(f"features of shape {features.shape}, expected {(rows.size, self.header.k)}")
        if rows.min() < 0 or rows.max() >= self.header.num_rows:
            raise IndexError(f"rows outside [0, {self.header.num_rows})")
        self.features[rows] = features
        self.features.flush()
        self.status[rows] = np.asarray(status, dtype=np.uint8)
        self.status.flush()

    def pending_rows(self) -> np.ndarray:
        return np.flatnonzero(self.status[: self.header.num_rows] == PENDING)

    @property
    def complete(self) -> bool:
        return self.pending_rows().size == 0

    def counts(self) -> dict[str, int]:
        st = np.asarray(self.status[: self.header.num_rows])
        return {name: int((st == code).sum()) for name, code in
                (("pending", PENDING), ("done", DONE), ("excluded", EXCLUDED), ("flagged", FLAGGED))}

    def matrix(self) -> np.ndarray:
        """``[N, k]`` float32 view of all features (zeros for excluded/flagged rows)."""
        return np.asarray(self.features[: self.header.num_rows])

    def statuses(self) -> np.ndarray:
        return np.asarray(self.status[: self.header.num_rows])
