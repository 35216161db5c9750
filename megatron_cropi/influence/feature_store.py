"""The feature store: projected per-prompt gradients ``[N, k]`` on disk, resumable row by row.

A directory with

* ``header.json``: what the features are (schema, rows, k, seed, projector, parameter-set hash,
  checkpoint step, prompt-id hash). Reopening with a different header is an error naming the field
  and both values: features of another projector or checkpoint must never mix.
* the features, ``[N, k]`` memory maps in the header's storage ``dtype`` (read back as float32):

  - ``float32`` (default): ``features.f32``, exact.
  - ``bfloat16``: ``features.bf16``, uint16 holding the high 16 bits of the float32 value after
    round-to-nearest-even; decoding shifts them back, so a stored value is recovered exactly and the
    error of a feature is at most 2^-8 of its magnitude (NaN stays NaN; range is float32's).
  - ``float16``: ``features.f16`` plus ``scales.f32`` ``[N]``: every row is divided by its max |x|
    (finite entries; 1 for an all-zero row) before the cast and multiplied back on reading, so no
    feature overflows (|x| ≤ 1 in storage whatever the gradient's scale) and the error is at most
    2^-12 of the row's max |x| (+ float32 rounding). Row norms are kept, so cosines and the target
    mean direction are those of the float32 features up to that rounding.
* ``status.u8``: ``[N]`` row states: 0 pending, 1 done, 2 excluded (all rewards equal: zero
  gradient), 3 flagged (NaN/inf). A row's features are flushed *before* its status, so a killed run
  never marks a row done without its data; pending rows are recomputed on resume.

The directory is created under a temporary name and renamed into place once initialised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from megatron_cropi.utils.atomic import atomic_write_json, fsync_dir

__all__ = ["FeatureHeader", "FeatureStore", "FeatureStoreMismatch", "PENDING", "DONE", "EXCLUDED", "FLAGGED",
           "FEATURE_DTYPES", "hash_strings", "encode_features", "decode_features", "feature_bytes_per_row",
           "prune_feature_stores"]

PENDING, DONE, EXCLUDED, FLAGGED = 0, 1, 2, 3
SCHEMA_VERSION = 1

FEATURE_DTYPES = ("float32", "float16", "bfloat16")
"""Storage dtypes of a feature store (``scoring.feature_dtype``); reads are always float32."""
_FEATURE_FILES = {"float32": ("features.f32", np.float32), "float16": ("features.f16", np.float16),
                  "bfloat16": ("features.bf16", np.uint16)}
_SCALES_FILE = "scales.f32"


def feature_bytes_per_row(dtype: str, k: int) -> int:
    """Bytes one row takes on disk in storage ``dtype``: features, fp16's row scale and the status byte."""
    return k * np.dtype(_FEATURE_FILES[dtype][1]).itemsize + (4 if dtype == "float16" else 0) + 1


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → uint16 bfloat16 bits, round to nearest even; NaN → a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), bits)


def _bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _row_scales(x: np.ndarray) -> np.ndarray:
    """Max |x| over the finite entries of each row of ``x`` ``[R, k]``; 1 for rows without any nonzero."""
    a = np.where(np.isfinite(x), np.abs(x), 0.0)
    s = a.max(axis=1).astype(np.float32) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


def encode_features(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 rows ``[R, k]`` → (stored array, per-row fp32 scales or None) in storage ``dtype``."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x, None
    if dtype == "bfloat16":
        return _f32_to_bf16_bits(x), None
    if dtype == "float16":
        scales = _row_scales(x)
        return (x.astype(np.float64) / scales[:, None]).astype(np.float16), scales
    raise ValueError(f"feature dtype {dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")


def decode_features(stored: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`encode_features`: float32 ``[R, k]``."""
    if dtype == "float32":
        return np.asarray(stored, dtype=np.float32)
    if dtype == "bfloat16":
        return _bf16_bits_to_f32(stored)
    if dtype == "float16":
        out = np.asarray(stored).astype(np.float32)
        out *= np.asarray(scales, dtype=np.float32)[:, None]  # in place: one [R, k] float32 array, not two
        return out
    raise ValueError(f"feature dtype {dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")


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
    dtype: str = "float32"
    """Storage dtype of the features (see the module docstring); stores without it are float32."""
    responses_per_prompt: int = 0
    """Responses per prompt the features were computed from (``scoring.max_responses_per_prompt``;
    0 = every stored response; stores without it used all)."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype {self.dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")


class FeatureStore:
    """Memory-mapped ``[N, k]`` features with a per-row status map; see the module docstring.

    Use :meth:`open` (creates or validates), then :meth:`write_rows` and :meth:`pending_rows`.
    """

    def __init__(self, path: Path, header: FeatureHeader, features: np.memmap, status: np.memmap,
                 scales: np.memmap | None = None):
        """``features`` is the raw memory map in the header's storage dtype (float16 rows are scaled by
        ``scales``); read float32 through :meth:`matrix` / :meth:`read_rows`."""
        self.path, self.header, self.features, self.status = path, header, features, status
        self.scales = scales

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
            sharded = isinstance(data, dict) and data.get("sharded")
            header = None if sharded else FeatureHeader(**data)
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise FeatureStoreMismatch(f"{path / 'header.json'} is not a feature-store header: {err}") from None
        if sharded:
            raise FeatureStoreMismatch(f"{path} is a sharded feature store (scoring.scale_out); read it with "
                                       "megatron_cropi.influence.sharded_store.load_feature_store")
        return header

    @classmethod
    def _create(cls, path: Path, header: FeatureHeader) -> None:
        tmp = path.with_name(f".{path.name}.creating")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        fname, fdtype = _FEATURE_FILES[header.dtype]
        np.memmap(tmp / fname, dtype=fdtype, mode="w+", shape=(max(header.num_rows, 1), header.k)).flush()
        if header.dtype == "float16":
            np.memmap(tmp / _SCALES_FILE, dtype=np.float32, mode="w+", shape=(max(header.num_rows, 1),)).flush()
        np.memmap(tmp / "status.u8", dtype=np.uint8, mode="w+", shape=(max(header.num_rows, 1),)).flush()
        atomic_write_json(tmp / "header.json", dataclasses.asdict(header))
        tmp.rename(path)
        fsync_dir(path.parent)

    @classmethod
    def _map(cls, path: Path, header: FeatureHeader, mode: str = "r+") -> "FeatureStore":
        n = max(header.num_rows, 1)
        fname, fdtype = _FEATURE_FILES[header.dtype]
        expected = {fname: n * header.k * np.dtype(fdtype).itemsize, "status.u8": n}
        if header.dtype == "float16":
            expected[_SCALES_FILE] = n * 4
        for name, size in expected.items():
            actual = (path / name).stat().st_size if (path / name).exists() else -1
            if actual != size:
                raise FeatureStoreMismatch(f"{path / name} has {actual} bytes, expected {size} for "
                                           f"{header.num_rows} rows × k={header.k}: the store is damaged")
        feats = np.memmap(path / fname, dtype=fdtype, mode=mode, shape=(n, header.k))
        status = np.memmap(path / "status.u8", dtype=np.uint8, mode=mode, shape=(n,))
        scales = (np.memmap(path / _SCALES_FILE, dtype=np.float32, mode=mode, shape=(n,))
                  if header.dtype == "float16" else None)
        return cls(path, header, feats, status, scales)

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
        stored, scales = encode_features(features, self.header.dtype)
        self.features[rows] = stored
        self.features.flush()
        if scales is not None:
            self.scales[rows] = scales
            self.scales.flush()
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
        """``[N, k]`` float32 features (zeros for excluded/flagged rows): a view of the file for float32
        stores, a decoded copy for float16/bfloat16 ones."""
        n = self.header.num_rows
        return decode_features(self.features[:n], self.header.dtype,
                               None if self.scales is None else self.scales[:n])

    def read_rows(self, rows) -> np.ndarray:
        """float32 features ``[R, k]`` of ``rows``, decoded from the storage dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        return decode_features(self.features[rows], self.header.dtype,
                               None if self.scales is None else self.scales[rows])

    def statuses(self) -> np.ndarray:
        return np.asarray(self.status[: self.header.num_rows])


def prune_feature_stores(features_root: str | Path, keep_stages: set[int]) -> int:
    """Delete the stores ``features_root/stage{m}`` whose ``m`` is not in ``keep_stages``; bytes freed.

    Each directory is first renamed to a hidden ``.stage{m}.pruning`` (atomic: readers see the whole
    stage or none of it), then removed. Leftover ``.stage*.pruning`` directories of an interrupted
    earlier call are removed too. Anything else under ``features_root`` is left alone.
    """
    root = Path(features_root)
    if not root.is_dir():
        return 0
    doomed: dict[Path, None] = {}  # ordered and without repeats: a leftover may be listed, then reused
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            continue
        m = re.fullmatch(r"stage(\d+)", entry.name)
        if m and int(m.group(1)) not in keep_stages:
            tmp = root / f".{entry.name}.pruning"
            if tmp.exists():
                shutil.rmtree(tmp)
            entry.rename(tmp)
            doomed[tmp] = None
        elif re.fullmatch(r"\.stage\d+\.pruning", entry.name):
            doomed[entry] = None
    if doomed:
        fsync_dir(root)
    freed = 0
    for d in doomed:
        freed += sum(f.lstat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(d)
    return freed
