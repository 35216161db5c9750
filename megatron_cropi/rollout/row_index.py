"""Where each prompt of a trajectory store lies: a compact sorted index, not a dictionary.

A store of N prompts is opened by every rank that scores it. A Python ``dict`` from prompt id to
``(part, row)`` costs about 200 bytes a prompt (the key object, the tuple, the table slot); at a
million prompts that is 200 MB on every rank before anything is scored. :class:`RowIndex` keeps the
ids as one sorted numpy byte-string array (UTF-8, fixed width: the longest id) beside two ``int32``
arrays, ``width + 8`` bytes a prompt (40 for the 32-character ids of
:func:`~megatron_cropi.data.prompt_ids.prompt_id`; 48 with the by-part grouping that column reads
build), and finds an id by binary search.

Order: UTF-8 byte order is Unicode code-point order, so the index's order is Python's ``sorted`` order
of the ids as strings: position ``i`` is the ``i``-th row of every prompt-id-ordered view of the store
(:meth:`~megatron_cropi.rollout.store.TrajectoryStore.prompt_ids`, the feature store's rows).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["RowIndex", "IdView", "CodedStrings"]


def _encode(ids: Iterable[str]) -> np.ndarray:
    encoded = [i.encode("utf-8") for i in ids]
    bad = next((i for i in encoded if i.endswith(b"\0")), None)
    if bad is not None:  # a fixed-width byte string drops trailing NULs: the id would not read back
        raise ValueError(f"prompt id {bad!r} ends in a NUL character; prompt ids must not")
    width = max((len(b) for b in encoded), default=1)
    return np.array(encoded, dtype=f"S{max(width, 1)}")


class RowIndex:
    """Sorted prompt ids with the part and row each is stored at.

    Attributes:
        ids: ``[N]`` bytes (``S{width}``), the UTF-8 ids in ascending order.
        part: ``[N]`` int32, the part number (position in :attr:`names`) of each id.
        row: ``[N]`` int32, the row within that part.
        names: the part file names, by part number.
    """

    def __init__(self) -> None:
        self.ids = np.zeros(0, dtype="S1")
        self.part = np.zeros(0, dtype=np.int32)
        self.row = np.zeros(0, dtype=np.int32)
        self.names: list[str] = []
        self._by_part: tuple[np.ndarray, np.ndarray] | None = None  # positions grouped by part, bounds

    @classmethod
    def from_arrays(cls, ids: np.ndarray, part: np.ndarray, row: np.ndarray, names: Sequence[str]) -> "RowIndex":
        """An index over arrays already sorted by id (e.g. memory-mapped from a store's index files)."""
        index = cls()
        index.ids, index.part, index.row, index.names = ids, part, row, list(names)
        return index

    def __len__(self) -> int:
        return int(self.ids.size)

    def add_parts(self, parts: Iterable[tuple[str, Sequence[str]]]) -> None:
        """Add parts ``(file name, ids in row order)``, read one at a time (each part's ids are encoded
        before the next is asked for, so a generator never holds more than one part as strings). Ids must
        be new (not checked here: :meth:`~megatron_cropi.rollout.store.TrajectoryStore.append` refuses
        repeats first). The new ids are sorted together and merged into place: O(N + n log n) for n new ids.

        Raises:
            ValueError: an id ends in a NUL character (a fixed-width byte string would drop it).
        """
        encoded, numbers, rows = [], [], []
        for name, ids in parts:
            encoded.append(_encode(ids))
            numbers.append(np.full(encoded[-1].size, len(self.names), np.int32))
            rows.append(np.arange(encoded[-1].size, dtype=np.int32))
            self.names.append(name)
        if not encoded:
            return
        width = f"S{max([self.ids.dtype.itemsize] + [e.dtype.itemsize for e in encoded])}"
        new = np.concatenate([e.astype(width) for e in encoded])
        numbers, rows = np.concatenate(numbers), np.concatenate(rows)
        order = np.argsort(new, kind="stable")
        old = self.ids.astype(width, copy=False)
        new = new[order].astype(width)
        at = np.searchsorted(old, new)
        self.ids = np.insert(old, at, new)
        self.part = np.insert(self.part, at, numbers[order])
        self.row = np.insert(self.row, at, rows[order])
        self._by_part = None

    def add_part(self, name: str, ids: list[str]) -> None:
        """:meth:`add_parts` for one part."""
        self.add_parts([(name, ids)])

    def position(self, prompt_id: str) -> int:
        """The id's position in sorted order, or -1 where it is not stored."""
        key = prompt_id.encode("utf-8")
        if len(key) > self.ids.dtype.itemsize or not self.ids.size:
            return -1
        i = int(np.searchsorted(self.ids, key))
        return i if i < self.ids.size and self.ids[i] == key else -1

    def locate(self, position: int) -> tuple[str, int]:
        """``(part file name, row)`` of the id at sorted ``position``."""
        return self.names[int(self.part[position])], int(self.row[position])

    def positions_of_part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, rows)``: for every row of part ``name``, its sorted position and its row number
        (each ``[n_part]`` int64, in row order): scatter a column read from the part with
        ``out[positions] = column[rows]``."""
        if self._by_part is None:  # one grouping for all parts, not a scan of N per part
            grouped = np.argsort(self.part, kind="stable")
            bounds = np.searchsorted(self.part[grouped], np.arange(len(self.names) + 1))
            self._by_part = (grouped, bounds)
        grouped, bounds = self._by_part
        number = self.names.index(name)
        positions = grouped[bounds[number]:bounds[number + 1]].astype(np.int64)
        rows = self.row[positions].astype(np.int64)
        order = np.argsort(rows, kind="stable")
        return positions[order], rows[order]

    def view(self) -> "IdView":
        """The sorted ids as a read-only sequence of strings that decodes each on access (no list of N
        string objects)."""
        return IdView(self.ids)

    def prompt_ids(self) -> list[str]:
        """Every id as a string, in sorted order."""
        return [b.decode("utf-8") for b in self.ids.tolist()]


class IdView(Sequence[str]):
    """``[N]`` UTF-8 byte strings seen as a sequence of ``str``; each decoded when read."""

    def __init__(self, ids: np.ndarray):
        self._ids = ids

    def __len__(self) -> int:
        return int(self._ids.size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [b.decode("utf-8") for b in self._ids[i].tolist()]
        return self._ids[i].decode("utf-8")

    def __iter__(self):
        for start in range(0, self._ids.size, 4096):  # a block of strings at a time, never all N
            yield from (b.decode("utf-8") for b in self._ids[start:start + 4096].tolist())


class CodedStrings(Sequence[str]):
    """A column of few distinct strings (a prompt's source) as ``[N]`` int32 codes into ``names``: 4 bytes a
    row where a list of strings holds a reference and a string object per row."""

    def __init__(self, codes: np.ndarray, names: Sequence[str]):
        self.codes, self.names = codes, tuple(names)

    def __len__(self) -> int:
        return int(self.codes.size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.names[c] for c in self.codes[i].tolist()]
        return self.names[int(self.codes[i])]

    def __iter__(self):
        return (self.names[c] for c in self.codes.tolist())
