"""Run a function on N local ranks the way torchrun would: fresh processes, torchrun's environment.

    results = run_ranks(my_worker, world_size=4, args=(cfg,), timeout_s=180)

Each rank is a fresh process (never forked from the caller: gloo and OpenMP state do not survive a
fork) forked from a server that has only imported torch and megatron-core (:data:`PRELOAD`), with
``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT`` set, one torch thread (several processes on
two cores oversubscribe badly), and the function's return value sent back through a file. A rank's
exception is re-raised in the caller with that rank's traceback; a hang is killed after ``timeout_s``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from megatron_cropi.utils.net import free_port

__all__ = ["RankFailure", "run_ranks"]


class RankFailure(RuntimeError):
    """A rank raised, died or timed out; the message carries its traceback or exit code."""


def _entry(fn, args, kwargs, rank, world_size, port, out_dir, threads, caller_env, env):
    # the caller's environment as it is now, as a spawned process would inherit it (the fork server's
    # was fixed when it started)
    os.environ.clear()
    os.environ.update(caller_env)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(threads))
    import torch

    torch.set_num_threads(threads)
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as err:  # noqa: BLE001 - reported to the parent verbatim
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, path)


# Modules every rank imports before it does anything (torch, megatron-core: ~6 s of a rank's start on
# the 2-core box). A forkserver imports them once per test process; each rank is then forked from that
# server, which never initialised gloo, OpenMP threads or a process group: a fresh rank in all but the
# import. CROPI_SPAWN=spawn starts every rank as a new interpreter instead.
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt"]
_CONTEXT: list = []


def _context():
    if not _CONTEXT:
        method = os.environ.get("CROPI_SPAWN", "forkserver")
        if method not in ("forkserver", "spawn"):
            raise ValueError(f"CROPI_SPAWN={method!r}: expected 'forkserver' or 'spawn'")
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _failed_rank(procs, out_dir) -> int | None:
    """A rank that has exited with an error result or without any result, if one has."""
    for r, p in enumerate(procs):
        if p.is_alive():
            continue
        path = Path(out_dir) / f"rank{r}.pkl"
        if not path.exists():
            if p.exitcode not in (None, 0):
                return r
            continue
        with open(path, "rb") as f:
            if pickle.load(f)[0] == "error":
                return r
    return None


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout_s: float = 300.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh ranks; return their results by rank.

    Args:
        fn: a module-level (picklable) function; it calls ``init_distributed()`` itself.
        world_size: number of ranks.
        timeout_s: wall-clock limit for the whole group.
        threads: torch/OpenMP threads per rank.
        env: extra environment variables for every rank.

    Raises:
        RankFailure: with the first failing rank's traceback, exit code, or the timeout.
    """
    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cropi-ranks-") as out_dir:
        procs = [
            ctx.Process(target=_entry, args=(fn, args, kwargs or {}, r, world_size, port, out_dir, threads,
                                             dict(os.environ), env or {}), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        failed = None
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout_s:.0f}s; still running: " + ", ".join(
                    f"rank {r}" for r, p in enumerate(procs) if p.is_alive())
                break
            # one failed rank usually leaves the others blocked in a collective: stop early
            if _failed_rank(procs, out_dir) is not None:
                failed = ""
                break
            time.sleep(0.05)
        if failed is not None:
            time.sleep(1.0)  # let siblings that are exiting on their own write their results
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=10)
        results, errors = [], []
        for r, p in enumerate(procs):
            path = Path(out_dir) / f"rank{r}.pkl"
            if path.exists():
                with open(path, "rb") as f:
                    status, value = pickle.load(f)
                if status == "error":
                    errors.append(f"rank {r} raised {value}")
                results.append(value)
            else:
                errors.append(f"rank {r} produced no result (exit code {p.exitcode})")
                results.append(None)
        if errors or failed:
            raise RankFailure("\n".join(([failed] if failed else []) + errors))
        return results
