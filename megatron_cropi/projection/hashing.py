"""Counter-based randomness of the projection: pure functions of (seed, parameter name, global index).

Every random choice of every projector (is coordinate j kept? which output slots and signs does it
get? which Gaussian values make up its column?) is computed here from integers only, with vectorised
torch integer ops, so the same numbers come out on any rank, for any sharding, chunking or batch
size, on CPU and on CUDA. Nothing here draws from a stateful generator.

Two hash functions:

* :func:`hash64` (per coordinate, computed once per shard and cached): SplitMix64. The state of
  counter ``j`` in stream ``key`` is ``key + j·φ`` (φ = 0x9E3779B97F4A7C15, mod 2^64); the output is
  Stafford's "mix13" finaliser of that state. ``key`` = :func:`stream_key` (seed, stream id, BLAKE2b
  of the global parameter name), derived in Python.
* :func:`mix32_` (per projection-matrix entry, the hot loop of the Gaussian backend): Wellons'
  ``lowbias32`` on int32 lanes, which vectorise (a 64-bit multiply does not on AVX2). A matrix
  word is ``lowbias32(column_key[j] XOR row_key[i])``: ``column_key`` comes from :func:`hash64` of the
  coordinate, ``row_key`` from :func:`hash64` of the word's row index. (Cheaper two-round mixers
  leave structured correlations between columns whose keys differ in one bit; lowbias32 does not.)

torch has no unsigned 32/64-bit shifts, so the code works on signed two's-complement int64/int32:
multiplication wraps modulo 2^64/2^32 on CPU and CUDA alike, and a logical right shift is an
arithmetic shift followed by a mask. Constants above the signed range are written as their signed
equivalents. ``tests/unit/test_projection_hashing.py`` checks every function against a pure-Python
integer reference.
"""

from __future__ import annotations

import hashlib
import math
import sys

import torch

__all__ = [
    "OPERATOR_VERSION",
    "STREAM_KEEP",
    "STREAM_COLUMN",
    "STREAM_ROW",
    "STREAM_SJLT",
    "name_hash",
    "stream_key",
    "hash64",
    "keep_threshold",
    "kept_mask",
    "low32",
    "high32",
    "mix32_",
    "row_keys",
    "gaussian_table",
    "gaussian_words",
    "words_to_entries",
    "column_keys",
    "sjlt_slots_signs",
]

if sys.byteorder != "little":  # words_to_entries splits int32 words through a uint16 view
    raise ImportError("megatron_cropi.projection.hashing assumes a little-endian host")

OPERATOR_VERSION = 1
"""Bumped whenever a change here changes any projector's output (recorded in artefact headers)."""

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
# lowbias32 (https://nullprogram.com/blog/2018/07/31/)
_MUL32_1 = 0x7FEB352D
_MUL32_2 = 0x846CA68B

# Stream ids: one independent random stream per kind of choice.
STREAM_KEEP = 1
"""Whether a coordinate is kept (upper 32 bits compared with the keep threshold)."""
STREAM_COLUMN = 2
"""The 32-bit column key of a kept coordinate (Gaussian/Rademacher backends)."""
STREAM_ROW = 3
"""Row keys of the Gaussian matrix (depend on the seed only)."""
STREAM_SJLT = 0x100
"""SJLT: stream ``STREAM_SJLT + t`` gives the slot and sign of a coordinate's t-th non-zero."""

GAUSSIAN_TABLE_BITS = 16
"""A matrix entry is one of 2^16 quantiles of N(0, 1); each 32-bit word yields two entries."""


def _signed64(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _mix64_py(z: int) -> int:
    """SplitMix64's finaliser on a Python int (the reference of :func:`hash64`)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & MASK64
    return z ^ (z >> 31)


def name_hash(name: str) -> int:
    """64-bit unsigned hash of a global parameter name (BLAKE2b; stable across processes)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def stream_key(seed: int, stream: int, name: str | int = 0) -> int:
    """The 64-bit key (unsigned Python int) of one random stream of one parameter.

    Args:
        seed: the projector's seed (any int; reduced mod 2^64).
        stream: which choice (``STREAM_*``).
        name: the global parameter name, or an already-hashed name, or 0 for name-free streams.
    """
    nh = name_hash(name) if isinstance(name, str) else int(name)
    z = _mix64_py(int(seed) + GOLDEN64)
    z = _mix64_py(z ^ (int(stream) & MASK64))
    return _mix64_py(z ^ (nh & MASK64))


def _lshr64_(x: torch.Tensor, shift: int, tmp: torch.Tensor) -> torch.Tensor:
    """``x ^= x >>> shift`` in place on int64 (logical shift = arithmetic shift + mask)."""
    torch.bitwise_right_shift(x, shift, out=tmp)
    tmp.bitwise_and_((1 << (64 - shift)) - 1)
    return x.bitwise_xor_(tmp)


def hash64(key: int, index: torch.Tensor) -> torch.Tensor:
    """SplitMix64 output number ``index`` of stream ``key``: 64 random bits per counter.

    Args:
        key: a :func:`stream_key`.
        index: int64 tensor of counters (global flat element indices), any shape, any device.

    Returns:
        int64 tensor of ``index``'s shape (the unsigned 64-bit value in two's complement).
    """
    if index.dtype != torch.int64:
        raise TypeError(f"hash64 expects int64 indices, got {index.dtype}")
    z = index * _signed64(GOLDEN64)
    z.add_(_signed64(key))
    tmp = torch.empty_like(z)
    _lshr64_(z, 30, tmp).mul_(_signed64(_MUL1))
    _lshr64_(z, 27, tmp).mul_(_signed64(_MUL2))
    return _lshr64_(z, 31, tmp)


def high32(h: torch.Tensor) -> torch.Tensor:
    """The upper 32 bits of int64 hashes as non-negative int64 values in ``[0, 2^32)``."""
    return torch.bitwise_right_shift(h, 32).bitwise_and_(0xFFFFFFFF)


def low32(h: torch.Tensor) -> torch.Tensor:
    """The lower 32 bits of int64 hashes as int32 (two's complement; exact, no overflow)."""
    v = h.bitwise_and(0xFFFFFFFF)
    v.sub_(torch.bitwise_right_shift(v, 31).bitwise_left_shift_(32))
    return v.to(torch.int32)


def keep_threshold(keep_ratio: float) -> int:
    """Coordinate j is kept iff ``high32(hash64(keep key, j)) < keep_threshold(keep_ratio)``.

    ``round(keep_ratio · 2^32)``, so each coordinate is kept independently with probability
    ``keep_ratio`` (to within 2^-33); 1.0 keeps all.
    """
    if not (0.0 < keep_ratio <= 1.0) or math.isnan(keep_ratio):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    return int(round(keep_ratio * (1 << 32)))


def kept_mask(key: int, index: torch.Tensor, threshold: int) -> torch.Tensor:
    """Bool mask of the kept coordinates among the int64 global ``index``."""
    if threshold >= 1 << 32:
        return torch.ones_like(index, dtype=torch.bool)
    return high32(hash64(key, index)) < threshold


def _lshr32_(x: torch.Tensor, shift: int, tmp: torch.Tensor) -> torch.Tensor:
    torch.bitwise_right_shift(x, shift, out=tmp)
    tmp.bitwise_and_((1 << (32 - shift)) - 1)
    return x.bitwise_xor_(tmp)


def mix32_(x: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """``lowbias32`` in place on an int32 tensor (``tmp``: optional scratch of the same shape)."""
    if x.dtype != torch.int32:
        raise TypeError(f"mix32_ expects int32, got {x.dtype}")
    tmp = torch.empty_like(x) if tmp is None else tmp
    _lshr32_(x, 16, tmp).mul_(_signed32(_MUL32_1))
    _lshr32_(x, 15, tmp).mul_(_signed32(_MUL32_2))
    return _lshr32_(x, 16, tmp)


def row_keys(seed: int, num_words: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 ``[num_words]``: the key of matrix word-row ``i`` (rows ``2i`` and ``2i+1``)."""
    idx = torch.arange(num_words, dtype=torch.int64, device=device)
    return low32(hash64(stream_key(seed, STREAM_ROW), idx))


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def gaussian_table(kind: str = "gaussian", device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``[2^16]`` values a matrix entry takes, indexed by 16 random bits.

    ``gaussian``: the midpoint quantiles ``Φ⁻¹((i + ½) / 2^16)``, rescaled to variance exactly 1
    (a 65536-level N(0, 1), tails at ±4.3σ). ``rademacher``: the signs of those, i.e. -1 for
    ``i < 2^15`` and +1 above, so a Rademacher matrix is the sign of the Gaussian one. Computed in
    float64 on CPU, so every device holds bit-identical values.
    """
    if kind not in ("gaussian", "rademacher"):
        raise ValueError(f"table kind must be 'gaussian' or 'rademacher', got {kind!r}")
    dev = torch.device(device)
    cache_key = (kind, str(dev))
    if cache_key not in _TABLES:
        n = 1 << GAUSSIAN_TABLE_BITS
        q = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
        q = q / q.square().mean().sqrt()
        if kind == "rademacher":
            q = torch.sign(q)
        _TABLES[cache_key] = q.to(torch.float32).to(dev)
    return _TABLES[cache_key]


def gaussian_words(column_keys: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None,
                   tmp: torch.Tensor | None = None) -> torch.Tensor:
    """int32 ``[m, w]`` matrix words: ``lowbias32(column_keys[j] ^ rows[i])``.

    Args:
        column_keys: int32 ``[m]`` keys of m coordinates.
        rows: int32 ``[w]`` row keys (:func:`row_keys`).
        out, tmp: optional int32 ``[m, w]`` buffers (reused across blocks to avoid allocation).
    """
    m, w = column_keys.numel(), rows.numel()
    out = torch.empty(m, w, dtype=torch.int32, device=rows.device) if out is None else out
    tmp = torch.empty_like(out) if tmp is None else tmp
    # lowbias32 starts with x ^= x >>> 16, which is linear over XOR: apply it to the m column keys
    # and the w row keys instead of the m·w words (same result, 3 of 12 passes saved).
    c, r = column_keys.clone(), rows.clone()
    _lshr32_(c, 16, torch.empty_like(c))
    _lshr32_(r, 16, torch.empty_like(r))
    torch.bitwise_xor(c.view(m, 1), r.view(1, w), out=out)
    out.mul_(_signed32(_MUL32_1))
    _lshr32_(out, 15, tmp).mul_(_signed32(_MUL32_2))
    return _lshr32_(out, 16, tmp)


def words_to_entries(words: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None,
                     index_buf: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[m, 2w]``: entry ``2i`` is ``table[low 16 bits of word i]``, ``2i+1`` the high 16.

    The split is a free reinterpretation of the contiguous int32 words as uint16 pairs (little-endian:
    the low half comes first), widened to int32 indices.

    Args:
        words: contiguous int32 ``[m, w]`` from :func:`gaussian_words`.
        table: :func:`gaussian_table`.
        out: optional float32 buffer with ``2·m·w`` elements.
        index_buf: optional int32 buffer with ``2·m·w`` elements.
    """
    m, w = words.shape
    halves = words.contiguous().view(torch.uint16)  # [m, 2w]
    idx = torch.empty(m * 2 * w, dtype=torch.int32, device=words.device) if index_buf is None else index_buf
    idx.view(m, 2 * w).copy_(halves)
    flat = torch.empty(m * w * 2, dtype=torch.float32, device=words.device) if out is None \
        else out.view(-1)
    torch.index_select(table, 0, idx.view(-1), out=flat)
    return flat.view(m, 2 * w)


def column_keys(seed: int, name: str, global_index: torch.Tensor) -> torch.Tensor:
    """int32 column keys of coordinates ``global_index`` (int64) of parameter ``name``."""
    return low32(hash64(stream_key(seed, STREAM_COLUMN, name), global_index))


def sjlt_slots_signs(seed: int, name: str, global_index: torch.Tensor, k: int, s: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output slots and signs of the SJLT's ``s`` non-zeros per coordinate.

    Block construction (Kane & Nelson): the k outputs are cut into s contiguous blocks
    ``[⌊tk/s⌋, ⌊(t+1)k/s⌋)``; non-zero t of coordinate j lands in block t at offset
    ``⌊high32(h)·size_t / 2^32⌋`` with sign ``(-1)^(h & 1)``, ``h = hash64(key(seed, SJLT+t, name), j)``.
    So the s slots of a coordinate are distinct.

    Returns:
        ``(slots int64 [s, m], signs int8 [s, m] in {-1, +1})``.
    """
    if not 1 <= s <= k:
        raise ValueError(f"sjlt needs 1 <= s <= k, got s={s}, k={k}")
    m = global_index.numel()
    slots = torch.empty(s, m, dtype=torch.int64, device=global_index.device)
    signs = torch.empty(s, m, dtype=torch.int8, device=global_index.device)
    for t in range(s):
        lo, hi = (t * k) // s, ((t + 1) * k) // s
        h = hash64(stream_key(seed, STREAM_SJLT + t, name), global_index.reshape(-1))
        torch.mul(high32(h), hi - lo, out=slots[t]).bitwise_right_shift_(32).add_(lo)
        signs[t] = 1 - 2 * h.bitwise_and(1)
    return slots, signs
