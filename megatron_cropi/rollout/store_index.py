"""A complete trajectory store's row index and selection columns, on disk and read memory-mapped.

Every rank that scores or selects from a store needs, per prompt, where it is stored (the sorted ids
with their part and row: :class:`~megatron_cropi.rollout.row_index.RowIndex`) and what selection reads
(pass rate, source). Built in memory on every rank, that is ~60 bytes a prompt of private memory (more
while it is built), growing with the pool. A complete store never changes, so
:meth:`~megatron_cropi.rollout.store.TrajectoryStore.mark_complete` writes them once::

    index/ids.npy        [N] S{width}  the UTF-8 ids, sorted
    index/part.npy       [N] int32     part number (position in the manifest's parts)
    index/row.npy        [N] int32     row within the part
    index/pass_rate.npy  [N] float64   share of rewards > 0.5 (0 for none)
    index/source.npy     [N] int32     source codes into the manifest entry's ``sources``
    index/longest.npy, index/tokens.npy, index/zero_variance.npy
                         [N] int64, int64, bool: the row summary over all responses (what scale-out's
                         plan reads; :meth:`~megatron_cropi.rollout.store.TrajectoryStore.row_summary`)

and commits them with the completion in the manifest (``"index": {"rows", "parts", "sources", "bytes"}``):
the manifest is the commit point, as it is for parts. Readers ``np.load(..., mmap_mode="r")``: the pages
are file-backed, shared through the page cache by the ranks of a node and given back under pressure,
so a rank's private memory stays flat in the pool. A store without the entry (incomplete, or completed
before the index existed) or whose index files do not match it is indexed in memory, as before.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_cropi.rollout.row_index import CodedStrings, RowIndex
from megatron_cropi.utils.atomic import atomic_write_bytes

__all__ = ["INDEX_DIR", "write_store_index", "load_store_index"]

log = logging.getLogger(__name__)

INDEX_DIR = "index"
_FILES = ("ids", "part", "row", "pass_rate", "source", "longest", "tokens", "zero_variance")


def write_store_index(path: Path, index: RowIndex, pass_rates: np.ndarray, sources: CodedStrings,
                      summary: dict[str, np.ndarray]) -> dict:
    """Write the index files of the store at ``path`` (each atomically); returns the manifest entry that
    commits them. ``pass_rates [N]``, ``sources`` (codes ``[N]``) and the row ``summary`` (``longest``,
    ``tokens``, ``zero_variance``, each ``[N]``) in the index's (prompt-id) order."""
    n = len(index)
    arrays = {"ids": index.ids, "part": index.part.astype(np.int32), "row": index.row.astype(np.int32),
              "pass_rate": np.asarray(pass_rates, np.float64), "source": np.asarray(sources.codes, np.int32),
              "longest": np.asarray(summary["longest"], np.int64), "tokens": np.asarray(summary["tokens"], np.int64),
              "zero_variance": np.asarray(summary["zero_variance"], bool)}
    sizes = {}
    for name, array in arrays.items():
        if array.shape != (n,):
            raise ValueError(f"store index column {name!r} has shape {array.shape}, expected ({n},)")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array))
        atomic_write_bytes(path / INDEX_DIR / f"{name}.npy", buf.getvalue())
        sizes[name] = buf.tell()
    return {"rows": n, "parts": len(index.names), "sources": list(sources.names), "bytes": sizes}


def load_store_index(path: Path, entry: dict, part_names: Sequence[str]
                     ) -> tuple[RowIndex, np.ndarray, CodedStrings, dict[str, np.ndarray]] | None:
    """The memory-mapped ``(index, pass rates [N], sources, row summary)`` the manifest ``entry`` commits,
    or None (logged) where a file is missing or does not match the entry: the caller indexes in memory."""
    folder = path / INDEX_DIR
    try:
        if entry.get("parts") != len(part_names):
            raise ValueError(f"{entry.get('parts')} parts indexed, the manifest lists {len(part_names)}")
        arrays = {}
        for name in _FILES:
            file = folder / f"{name}.npy"
            size = file.stat().st_size
            if size != entry["bytes"][name]:
                raise ValueError(f"{file.name}: {size} bytes, the manifest recorded {entry['bytes'][name]}")
            arrays[name] = np.load(file, mmap_mode="r")
            if arrays[name].shape != (entry["rows"],):
                raise ValueError(f"{file.name}: shape {arrays[name].shape}, expected ({entry['rows']},)")
    except (OSError, KeyError, TypeError, ValueError) as err:
        log.warning("trajectory store %s: its index is not usable (%s); indexing in memory", path, err)
        return None
    index = RowIndex.from_arrays(arrays["ids"], arrays["part"], arrays["row"], part_names)
    summary = {name: arrays[name] for name in ("longest", "tokens", "zero_variance")}
    return index, arrays["pass_rate"], CodedStrings(arrays["source"], entry["sources"]), summary
