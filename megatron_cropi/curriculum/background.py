"""Scoring off the critical path (``curriculum.background_scoring``): the job and the run's handles on
whoever does it: a child process (:class:`BackgroundScorer`, ``curriculum.background_scorer: child``) or
an external scoring job (:class:`ExternalScorer`, ``external``: the files of
:mod:`.scoring_service`).

A selecting stage m normally scores the pool at θ_m, selects, and only then trains. With background
scoring the parent starts one child process (``python -m megatron_cropi.commands.background_scorer
CONFIG JOB``: :func:`run_job`) early (:meth:`BackgroundScorer.start`: it imports and loads the run's data while the parent rolls
out or trains, then waits for ``JOB``); once the parent submits the job, the child, at θ_m (an HF directory: β's, or θ_m exported by the parent), scores every feature set, runs the
projection probe and selects, exactly as the controller's own steps do; the parent meanwhile trains
stage m on the whole pool and switches to the selection before the first step after the child is done
(:mod:`.background_stage`). The features and the selection equal the foreground's (the same weights,
the same code), only the steps trained before the switch differ. The probe is a report, not an input of
the selection: the child writes its result (scores and selection) first, so that the stage can switch,
then probes and writes ``probe.json`` beside it; the parent records the probe at the stage's end.

The child:

* dies with its parent (``PR_SET_PDEATHSIG``): a killed run leaves no scorer writing into its stores;
  the restarted run starts a new child, which resumes the feature stores where they stopped;
* is stopped (SIGSTOP) while the parent evaluates, since evaluation is charged to nobody and the child
  must not gain time from it;
* writes ``result.json`` atomically when the selection is made, then ``probe.json`` and exits; its exit
  status and log (``log``) say why otherwise.

Its wall time (launch to the parent seeing it done, pauses excluded) goes to ``background_clock`` in
``state.json``, not to the run clock: on a machine with a free core (or GPU) it delays no training step.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from megatron_cropi.utils.atomic import atomic_write_json

__all__ = ["ERROR_FILE", "PROBE_FILE", "SERVING_FILE", "STALE_S", "STOP_FILE", "TAKEN_FILE", "BackgroundJob",
           "BackgroundScorer", "BackgroundScoringError", "BackgroundWaitError", "ExternalScorer", "die_with_parent",
           "wait_for_job"]

# a launched controller's variables (the child must not join its process group) and the injected faults,
# which are the parent's (a test that kills the parent at a point must not kill the child there)
_PARENT_ONLY_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "TORCHELASTIC_RUN_ID", "CROPI_FAULT_AT")


PROBE_FILE = "probe.json"  # beside the job's result: the child's projection probe, written after the result
TAKEN_FILE, ERROR_FILE = "taken.json", "error.json"  # beside it, from an external scoring job
STOP_FILE = "stop"  # in background/: the run has finished (an external scoring job exits)
SERVING_FILE = "serving.json"  # in background/: the external scoring job's heartbeat (owner, host, pid, time)
STALE_S = 30.0  # a heartbeat older than this: the scoring job is gone (it beats every 5 s)


class BackgroundScoringError(RuntimeError):
    """The background scorer exited without a result."""


class BackgroundWaitError(BackgroundScoringError):
    """No scoring job served the run's job within ``curriculum.background_wait_s``."""


@dataclasses.dataclass(frozen=True)
class BackgroundJob:
    """What the child does once the parent submits it: roll the behaviour sets out into ``stores`` when
    ``rollouts_policy`` says so, score ``stores`` into ``features`` with the policy in ``policy_hf`` (recorded as
    checkpoint step ``checkpoint_step``), probe, select stage ``stage`` from the pass rates of
    ``pool_rollouts``, and write ``result``."""

    stage: int
    policy_hf: str
    checkpoint_step: int
    stores: dict[str, str]
    features: dict[str, str]
    pool_rollouts: str
    result: str
    attempt: str = ""
    """Names this submission: the result and probe carry it (an external job may still finish an earlier one)."""
    rollouts_policy: str = ""
    """``curriculum.background_rollouts``: first roll the behaviour sets out at ``policy_hf`` into ``stores``
    (this is the policy's identity for their headers); empty: the stores are there already."""

    def write(self, path: Path) -> None:
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> "BackgroundJob":
        return cls(**json.loads(Path(path).read_text()))


class _JobClock:
    """A submitted job's wall seconds, pauses excluded (:meth:`elapsed`; :attr:`seconds` once done)."""

    def __init__(self, stage: int):
        self.stage = stage
        self.job: BackgroundJob | None = None
        self.started = time.perf_counter()
        self.submitted: float | None = None
        self.paused_seconds = 0.0
        self.pause_started: float | None = None
        self.seconds: float | None = None
        """Wall seconds from the job's submission to the run seeing its result, pauses excluded."""

    def elapsed(self) -> float:
        """Seconds the submitted job has run so far (pauses excluded; 0 before it is submitted)."""
        if self.seconds is not None:
            return self.seconds
        if self.submitted is None:
            return 0.0
        now = time.perf_counter()
        pausing = now - self.pause_started if self.pause_started is not None else 0.0
        return now - self.submitted - self.paused_seconds - pausing

    def _done(self, result: dict) -> dict:
        if self.seconds is None:
            self.seconds = time.perf_counter() - (self.submitted or self.started) - self.paused_seconds
        return {**result, "background_seconds": self.seconds}

    def poll(self) -> dict | None:
        raise NotImplementedError

    def poll_probe(self) -> dict | None:
        raise NotImplementedError


class BackgroundScorer(_JobClock):
    """The parent's handle on a child process (:meth:`start`, then :meth:`submit`)."""

    def __init__(self, stage: int, job_path: Path, proc: subprocess.Popen, log_path: Path):
        super().__init__(stage)
        self.job_path, self.proc, self.log_path = job_path, proc, log_path

    def describe(self) -> str:
        return f"pid {self.proc.pid}"

    @classmethod
    def start(cls, stage: int, config: Path, job_path: Path, log_path: Path, *, threads: int = 1) -> "BackgroundScorer":
        """Start stage ``stage``'s child on the run config ``config`` (YAML); it works once :meth:`submit`
        writes ``job_path`` (a job file left there by an earlier attempt is removed first). Its output is
        appended to ``log_path``."""
        job_path.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _PARENT_ONLY_VARS}
        env["OMP_NUM_THREADS"] = str(max(threads, 1))
        env["CROPI_PARENT_PID"] = str(os.getpid())
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "megatron_cropi.commands.background_scorer", str(config),
                                     str(job_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        return cls(stage, job_path, proc, log_path)

    def submit(self, job: BackgroundJob) -> None:
        """Hand the child its job (its result and probe files, if an earlier attempt left them, are removed
        first)."""
        Path(job.result).unlink(missing_ok=True)
        Path(job.result).with_name(PROBE_FILE).unlink(missing_ok=True)
        self.job, self.submitted, self.paused_seconds = job, time.perf_counter(), 0.0
        job.write(self.job_path)

    def poll(self) -> dict | None:
        """The child's result (scores and selection; ``background_seconds``: :attr:`seconds`) once it has
        written it, whether or not it still probes; None while it works on it.

        Raises:
            BackgroundScoringError: it exited without writing its result (the log's tail says why).
        """
        path = Path(self.job.result) if self.job is not None else None
        rc = self.proc.poll()  # before the file: a child that wrote it and exited is not taken for a failure
        if path is not None and path.exists():
            return self._done(json.loads(path.read_text()))
        if rc is None:
            return None
        raise self._failure(rc, "no result")

    def poll_probe(self) -> dict | None:
        """The child's probe (``probe.json``) once it has exited after its result; None while it runs.

        Raises:
            BackgroundScoringError: it exited with a nonzero status (the log's tail says why).
        """
        rc = self.proc.poll()
        if rc is None:
            return None
        if rc != 0:
            raise self._failure(rc, "no probe")
        path = Path(self.job.result).with_name(PROBE_FILE) if self.job is not None else None
        if path is None or not path.exists():
            return {"skipped": "the background scorer wrote no probe"}
        return json.loads(path.read_text())

    def _failure(self, rc: int, what: str) -> BackgroundScoringError:
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-15:] if self.log_path.exists() else []
        return BackgroundScoringError(f"the background scorer of stage {self.stage} exited with status {rc} "
                                      f"and {what}; its log {self.log_path} ends:\n" + "\n".join(tail))

    @contextmanager
    def paused(self):
        """Stop the child (SIGSTOP) for the duration of the block, e.g. an evaluation."""
        if self.proc.poll() is not None:
            yield
            return
        self.pause_started = time.perf_counter()
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
            self.paused_seconds += time.perf_counter() - self.pause_started
            self.pause_started = None

    def kill(self) -> None:
        """Stop the child if it still runs (a parent that fails takes its scorer down with it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


class ExternalScorer(_JobClock):
    """The run's handle on its job for an external scoring job (``curriculum.background_scorer: external``):
    files in ``root`` (``background/stage{m}/``) only, read and written by the run's global rank 0.

    The scoring job runs on devices of its own, so it is not paused while the run evaluates, and it is
    not stopped with the stage: it serves the run until ``background/stop``.
    """

    def __init__(self, stage: int, root: Path):
        super().__init__(stage)
        self.root = root
        self._beat: object = None  # the heartbeat's last time stamp seen, and when (monotonic) it changed
        self._beat_seen = 0.0

    def describe(self) -> str:
        return "external scoring job (`cropi serve-scoring`)"

    def submit(self, job: BackgroundJob) -> None:
        """Write the job, or adopt the job already there when it asks for the same work and did not fail
        (a restarted run: the scoring job may be at work on it, or have finished it; its attempt id,
        pick-up and result stand). Otherwise an earlier attempt's result, probe, error and pick-up are
        removed first. :attr:`job` is the job in force (its ``attempt`` the adopted one)."""
        try:
            earlier = BackgroundJob.read(self.root / "job.json")
        except (OSError, ValueError, TypeError):
            earlier = None
        self.submitted = time.perf_counter()
        if earlier is not None and dataclasses.replace(earlier, attempt=job.attempt) == job:
            self.job = earlier
            if self._read(ERROR_FILE) is None:
                return
        for name in (Path(job.result).name, PROBE_FILE, ERROR_FILE, TAKEN_FILE):
            (self.root / name).unlink(missing_ok=True)
        self.job = job
        job.write(self.root / "job.json")

    def _read(self, name: str) -> dict | None:
        """The job's file ``name`` when it is this attempt's."""
        path = self.root / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # absent (files are written atomically)
            return None
        return data if self.job is not None and data.get("attempt") == self.job.attempt else None

    def _raise_error(self) -> None:
        error = self._read(ERROR_FILE)
        if error is not None:
            raise BackgroundScoringError(f"the external scoring job failed stage {self.stage}: {error['error']} "
                                         f"({self.root / ERROR_FILE}; its traceback ends: "
                                         + " | ".join(error.get("traceback", [])[-3:]) + ")")

    def poll(self) -> dict | None:
        """The job's result (as :meth:`BackgroundScorer.poll` gives it) once written; None before.

        Raises:
            BackgroundScoringError: the scoring job wrote this attempt's ``error.json`` and no result.
        """
        result = self._read(Path(self.job.result).name) if self.job is not None else None
        if result is not None:
            return self._done(result)
        self._raise_error()
        return None

    def poll_probe(self) -> dict | None:
        """This attempt's probe (``probe.json``) once written; None before.

        Raises:
            BackgroundScoringError: the scoring job failed after its result (the probe).
        """
        probe = self._read(PROBE_FILE)
        if probe is None:
            self._raise_error()
        return probe

    def taken(self) -> bool:
        """Whether a scoring job has started on this attempt."""
        return self._read(TAKEN_FILE) is not None

    def serving(self) -> bool:
        """Whether a live scoring job works on this attempt: it took the job and its heartbeat has changed
        within :data:`STALE_S` seconds as this host saw it (:meth:`beat_unchanged_for`)."""
        age = self.beat_unchanged_for()
        return self.taken() and age is not None and age < STALE_S

    def beat_unchanged_for(self) -> float | None:
        """Seconds, on this host's monotonic clock, since this handle saw the heartbeat's time stamp change
        (0 when first seen; None without a heartbeat). The job's clock is never compared with this
        host's: a skew between them cannot make a live job look dead."""
        try:
            beat = json.loads((self.root.parent / SERVING_FILE).read_text())["time"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        now = time.monotonic()
        if beat != self._beat:
            self._beat, self._beat_seen = beat, now
        return now - self._beat_seen

    def heartbeat_age(self) -> float | None:
        """Seconds since the scoring job's last heartbeat (``background/serving.json``); None if none."""
        try:
            return time.time() - float(json.loads((self.root.parent / SERVING_FILE).read_text())["time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextmanager
    def paused(self):
        """No pause: the scoring job runs on devices of its own."""
        yield

    def kill(self) -> None:
        """Nothing: the scoring job serves the run until it finishes (``background/stop``)."""


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the parent dies, even by SIGKILL (``PR_SET_PDEATHSIG``)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's clean-up (kill) still applies
        return
    parent = os.environ.get("CROPI_PARENT_PID")
    if parent and os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


def wait_for_job(path: Path, poll_s: float = 0.05) -> BackgroundJob:
    """The job the parent submits to ``path`` (the child is killed with its parent, so this ends)."""
    while not path.exists():
        time.sleep(poll_s)
    return BackgroundJob.read(path)
