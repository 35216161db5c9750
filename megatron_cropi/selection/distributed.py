"""Top-m and quantiles of scores spread over ranks: counts meet, the rows stay where they are.

Each rank holds some rows of a pool: ``rows [n_r]`` (global row ids, disjoint across ranks) and
``scores [n_r]`` (float64; a non-finite score is never selected). :func:`distributed_top_m` marks this
rank's rows that belong to the global top ``m`` in the order of
:func:`~megatron_cropi.selection.scores.top_m` (higher score first, equal scores by lower row) without
moving a row:

* every score maps to a 64-bit key in the same order (:func:`order_keys`);
* the ``m``-th largest key ``T`` is found by bisection over ``[0, 2^64)``: 64 steps, each one
  all-reduced count ``|{key ≥ mid}|``;
* of the rows whose key equals ``T``, the ``m − |{key > T}|`` with the lowest row ids are taken: a
  second bisection over row ids (⌈log2 N⌉ steps).

Several order statistics share the steps (:func:`kth_largest_keys` all-reduces one count per search),
which is how :func:`distributed_quantiles` gives ``np.quantile`` of the union. Every step all-reduces a
few int64, so what a rank receives does not grow with the pool or with the number of ranks; about 130
tiny all-reduces per top-m.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["order_keys", "key_values", "global_sum", "kth_largest_keys", "distributed_top_m", "distributed_quantiles"]

_SIGN = np.uint64(1 << 63)


def order_keys(scores: np.ndarray) -> np.ndarray:
    """``[n]`` uint64 keys in the order of the float64 ``scores`` (finite or ±inf; ``-0.0`` taken as
    ``0.0``): ``a < b`` exactly when ``key(a) < key(b)``. Positive floats get the sign bit set, negative
    ones are bit-inverted (their magnitude order reverses)."""
    bits = (np.asarray(scores, dtype=np.float64) + 0.0).view(np.uint64)  # + 0.0: -0.0 becomes 0.0
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_values(keys: Sequence[int]) -> np.ndarray:
    """The float64 scores of ``keys`` (the inverse of :func:`order_keys`)."""
    k = np.asarray([int(x) for x in keys], dtype=np.uint64)
    return np.where(k & _SIGN, k & ~_SIGN, ~k).view(np.float64)


def _device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sum(values: Sequence[int], group=None) -> np.ndarray:
    """``[len(values)]`` int64: ``values`` summed over the ranks of ``group`` (the values themselves when
    no process group is initialised)."""
    out = np.asarray(values, dtype=np.int64)
    if not dist.is_initialized():
        return out
    box = torch.from_numpy(out.copy()).to(_device(group))
    dist.all_reduce(box, group=group)
    return box.cpu().numpy()


def _global_max(value: int, group=None) -> int:
    if not dist.is_initialized():
        return int(value)
    box = torch.tensor([int(value)], dtype=torch.int64, device=_device(group))
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return int(box.item())


def kth_largest_keys(keys: np.ndarray, ks: Sequence[int], group=None) -> list[int]:
    """For each ``k`` in ``ks`` (1-based, at most the number of keys over all ranks), the ``k``-th
    largest key of the union of every rank's ``keys`` (uint64): the largest ``T`` with
    ``|{key ≥ T}| ≥ k``. A collective: 64 all-reduces of ``len(ks)`` int64."""
    keys = np.asarray(keys, dtype=np.uint64)
    lo = [0] * len(ks)            # |{key >= 0}| is everything: >= k
    hi = [1 << 64] * len(ks)      # |{key >= 2^64}| = 0 < k
    for _ in range(64):           # the interval halves every round; all ranks run the same rounds
        mid = [(a + b) // 2 for a, b in zip(lo, hi)]
        counts = global_sum([int((keys >= np.uint64(x)).sum()) for x in mid], group)
        for i, (x, c) in enumerate(zip(mid, counts)):
            if c >= ks[i]:
                lo[i] = x
            else:
                hi[i] = x
    return lo


def distributed_top_m(scores: np.ndarray, rows: np.ndarray, m: int, group=None) -> np.ndarray:
    """``[n_r]`` bool: this rank's rows among the global top ``m`` finite ``scores`` (fewer when fewer
    are finite), in :func:`~megatron_cropi.selection.scores.top_m`'s order: the same rows that function
    picks from the ``[N]`` array the ranks' ``(rows, scores)`` make up. A collective.

    Args:
        scores: ``[n_r]`` float64 of this rank's rows.
        rows: ``[n_r]`` int64 global row ids, disjoint across ranks (they break ties).
    """
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.int64)
    finite = np.isfinite(scores)
    take = min(int(m), int(global_sum([int(finite.sum())], group)[0]))
    out = np.zeros(scores.shape[0], dtype=bool)
    if take <= 0:
        return out
    keys = np.zeros(scores.shape[0], dtype=np.uint64)
    keys[finite] = order_keys(scores[finite])
    threshold = np.uint64(kth_largest_keys(keys[finite], [take], group)[0])
    above = finite & (keys > threshold)
    at = finite & (keys == threshold)
    need = take - int(global_sum([int(above.sum())], group)[0])  # >= 1 rows at the threshold
    lo, hi = -1, _global_max(int(rows.max()) if rows.size else -1, group)  # |{row <= hi, at}| >= need
    while hi - lo > 1:  # the same bounds on every rank, so the same rounds
        mid = (lo + hi) // 2
        if global_sum([int((at & (rows <= mid)).sum())], group)[0] >= need:
            hi = mid
        else:
            lo = mid
    return above | (at & (rows <= hi))


def distributed_quantiles(values: np.ndarray, qs: Sequence[float], group=None) -> list[float] | None:
    """``np.quantile`` (linear) of the finite ``values`` of every rank at each ``q`` in ``qs``; None when
    no rank holds a finite value. A collective."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = int(global_sum([values.size], group)[0])
    if n == 0:
        return None
    positions = [(n - 1) * q for q in qs]
    lows = [int(np.floor(h)) for h in positions]
    # the i-th smallest (0-based) of n is the (n - i)-th largest
    wanted = sorted({i for lo in lows for i in (lo, min(lo + 1, n - 1))})
    found = kth_largest_keys(order_keys(values), [n - i for i in wanted], group)
    value_of = dict(zip(wanted, key_values(found)))
    # numpy's own interpolation between the two neighbours: a 2-point quantile at the fractional part
    return [float(np.quantile([value_of[lo], value_of[min(lo + 1, n - 1)]], h - lo)) for h, lo in zip(positions, lows)]
