"""math-verify in a process pool with a per-answer timeout enforced by the parent.

math-verify bounds its own parsing and comparison with ``signal.alarm``, which raises "signal only
works in main thread" off the main thread (Ray actors, thread-pool reward workers); frameworks that
caught that error shipped silent all-zero rewards, and turning the timeout off gave hangs
instead. Here every answer is checked in a worker process of a
``concurrent.futures.ProcessPoolExecutor`` (spawn context) with math-verify's own timeouts disabled,
and the *parent* enforces the bound:

* at most ``num_workers`` answers are in flight, so each submitted answer is running and its clock
  is its submission time;
* an answer past ``timeout_s`` scores 0, is logged with the running count, and the pool's workers are
  killed and replaced (a hung worker cannot be interrupted); answers that were in flight beside it are
  resubmitted, not scored 0;
* a crashed worker (BrokenProcessPool) gets its answers retried once, then 0 and an error count.

So :meth:`MathVerifier.score` works from any thread, returns within about
``timeout_s × (timeouts + 1)`` plus pool restarts, and every 0 that is not a wrong answer is counted in
:attr:`MathVerifier.stats` and logged.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from megatron_cropi.rewards.verifier import VerifyItem, register_verifier
from megatron_cropi.rewards.config import RewardConfig
from megatron_cropi.rewards.extract import has_boxed_answer

__all__ = ["MathVerifier", "VerifierStats", "verify_math_answer"]

log = logging.getLogger(__name__)


def verify_math_answer(response: str, reference: str) -> float:
    """1.0 if math-verify finds the response's final answer equal to ``reference`` (runs in a worker).

    The reference is wrapped in ``\\boxed{}`` unless it is boxed already; the response is parsed with
    math-verify's default LaTeX + expression extraction (a boxed answer has priority, else the last
    expression). math-verify's signal-based timeouts are off: the parent process bounds the time.
    """
    from math_verify import parse, verify

    gold_text = reference if "\\boxed" in reference else f"\\boxed{{{reference}}}"
    gold = parse(gold_text, parsing_timeout=None)
    pred = parse(response, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(bool(verify(gold, pred, timeout_seconds=None)))


def _warm() -> int:
    import logging as _logging
    import os

    _logging.getLogger("math_verify").setLevel(_logging.ERROR)  # "timeout is disabled" warnings
    import math_verify  # noqa: F401 - import sympy/antlr once per worker, before any clock runs

    return os.getpid()


def _call(fn, response: str, reference: str) -> float:
    return float(fn(response, reference))


@dataclass
class VerifierStats:
    """Running counts of one verifier: answers scored, timed out, errored and pool restarts."""

    scored: int = 0
    timeouts: int = 0
    errors: int = 0
    restarts: int = 0


@register_verifier("math")
class MathVerifier:
    """Process-pool math-verify with a per-answer timeout.

    Args:
        cfg: ``timeout_s`` and ``num_workers`` are read from it (default :class:`RewardConfig`).
        verify_fn: a picklable module-level ``fn(response, reference) -> float`` run in the workers
            (default :func:`verify_math_answer`; tests inject slow or crashing functions here).
    """

    name = "math"

    def __init__(self, cfg: RewardConfig | None = None, *, verify_fn: Callable[[str, str], float] = verify_math_answer):
        cfg = cfg or RewardConfig(verifier="math")
        self.timeout_s = float(cfg.timeout_s)
        self.num_workers = int(cfg.num_workers)
        self.verify_fn = verify_fn
        self.stats = VerifierStats()
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()  # one score() at a time per verifier; callable from any thread

    # -- pool management -------------------------------------------------------------------------
    def _start_pool(self) -> cf.ProcessPoolExecutor:
        pool = cf.ProcessPoolExecutor(max_workers=self.num_workers, mp_context=mp.get_context("spawn"))
        # start every worker and import math-verify before any answer's clock starts
        for f in [pool.submit(_warm) for _ in range(self.num_workers)]:
            f.result(timeout=120)
        return pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list(getattr(pool, "_processes", {}).values())
        for p in procs:  # a hung worker never returns: kill, don't wait
            if p.is_alive():
                p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(timeout=5)

    def close(self) -> None:
        with self._lock:
            self._kill_pool()

    def __del__(self):
        try:
            self._kill_pool()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- scoring ---------------------------------------------------------------------------------
    def format_ok(self, item: VerifyItem) -> bool:
        """A complete non-empty ``\\boxed{}`` answer, and the response finished."""
        return item.finished and has_boxed_answer(item.response)

    def score(self, items: Sequence[VerifyItem]) -> np.ndarray:
        """Correctness of each item (``float32 [N]``); a timed-out or failing answer scores 0, logged."""
        with self._lock:
            return self._score(items)

    def _score(self, items: Sequence[VerifyItem]) -> np.ndarray:
        out = np.zeros(len(items), dtype=np.float32)
        pending = deque(range(len(items)))
        attempts = [0] * len(items)
        inflight: dict[cf.Future, tuple[int, float]] = {}
        timeouts = errors = 0
        while pending or inflight:
            if self._pool is None:
                self._pool = self._start_pool()
            while pending and len(inflight) < self.num_workers:
                i = pending.popleft()
                attempts[i] += 1
                fut = self._pool.submit(_call, self.verify_fn, items[i].response, items[i].reference)
                inflight[fut] = (i, time.monotonic() + self.timeout_s)
            next_deadline = min(d for _, d in inflight.values())
            done, _ = cf.wait(inflight, timeout=max(0.0, next_deadline - time.monotonic()),
                              return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in done:
                i, _ = inflight.pop(fut)
                try:
                    out[i] = 1.0 if fut.result() >= 0.5 else 0.0
                except cf.process.BrokenProcessPool:
                    broken = True
                    if attempts[i] < 2:
                        pending.appendleft(i)
                    else:
                        errors += 1
                        log.error("math verifier: a worker crashed twice on answer %d; scored 0", i)
                except Exception as err:  # noqa: BLE001 - an answer math-verify cannot handle is wrong
                    errors += 1
                    log.debug("math verifier: answer %d raised %s: %s; scored 0", i, type(err).__name__, err)
            now = time.monotonic()
            expired = [f for f, (_, d) in inflight.items() if d <= now and not f.done()]
            if expired or broken:
                for fut in expired:
                    i, _ = inflight.pop(fut)
                    timeouts += 1
                    out[i] = 0.0
                # the pool cannot interrupt one task: replace it, and re-run the innocent in-flight answers
                for fut, (i, _) in list(inflight.items()):
                    pending.appendleft(i)
                inflight.clear()
                self._kill_pool()
                self.stats.restarts += 1
        self.stats.scored += len(items)
        self.stats.timeouts += timeouts
        self.stats.errors += errors
        if timeouts:
            log.warning("math verifier: %d of %d answers timed out after %.1fs and scored 0 (%d timeouts in "
                        "total, %d worker-pool restarts)", timeouts, len(items), self.timeout_s,
                        self.stats.timeouts, self.stats.restarts)
        if errors:
            log.warning("math verifier: %d of %d answers failed to parse or verify and scored 0 (%d in total)",
                        errors, len(items), self.stats.errors)
        return out
