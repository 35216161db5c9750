"""Scoring off the critical path (``curriculum.background_scoring``): the job and its process.

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

__all__ = ["PROBE_FILE", "BackgroundJob", "BackgroundScorer", "BackgroundScoringError", "die_with_parent", "run_job"]

# a launched controller's variables (the child must not join its process group) and the injected faults,
# which are the parent's (a test that kills the parent at a point must not kill the child there)
_PARENT_ONLY_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "TORCHELASTIC_RUN_ID", "CROPI_FAULT_AT")


PROBE_FILE = "probe.json"  # beside the job's result: the child's projection probe, written after the result


class BackgroundScoringError(RuntimeError):
    """The background scorer exited without a result."""


@dataclasses.dataclass(frozen=True)
class BackgroundJob:
    """What the child does once the parent submits it: score ``stores`` into ``features`` with the policy in ``policy_hf`` (recorded as
    checkpoint step ``checkpoint_step``), probe, select stage ``stage`` from the pass rates of
    ``pool_rollouts``, and write ``result``."""

    stage: int
    policy_hf: str
    checkpoint_step: int
    stores: dict[str, str]
    features: dict[str, str]
    pool_rollouts: str
    result: str

    def write(self, path: Path) -> None:
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> "BackgroundJob":
        return cls(**json.loads(Path(path).read_text()))


class BackgroundScorer:
    """The parent's handle on a child process (:meth:`start`, then :meth:`submit`)."""

    def __init__(self, stage: int, job_path: Path, proc: subprocess.Popen, log_path: Path):
        self.stage, self.job_path, self.proc, self.log_path = stage, job_path, proc, log_path
        self.job: BackgroundJob | None = None
        self.started = time.perf_counter()
        self.submitted: float | None = None
        self.paused_seconds = 0.0
        self.pause_started: float | None = None
        self.seconds: float | None = None
        """Wall seconds from the job's submission to the parent seeing the child done, pauses excluded."""

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

    def elapsed(self) -> float:
        """Seconds the submitted job has run so far (pauses excluded; 0 before :meth:`submit`)."""
        if self.seconds is not None:
            return self.seconds
        if self.submitted is None:
            return 0.0
        now = time.perf_counter()
        pausing = now - self.pause_started if self.pause_started is not None else 0.0
        return now - self.submitted - self.paused_seconds - pausing

    def submit(self, job: BackgroundJob) -> None:
        """Hand the child its job (its result and probe files, if an earlier attempt left them, are removed
        first)."""
        Path(job.result).unlink(missing_ok=True)
        Path(job.result).with_name(PROBE_FILE).unlink(missing_ok=True)
        self.job, self.submitted, self.paused_seconds = job, time.perf_counter(), 0.0
        job.write(self.job_path)

    def poll(self) -> dict | None:
        """The child's result (scores and selection) once it has written it, whether or not it still
        probes; None while it works on it.

        Raises:
            BackgroundScoringError: it exited without writing its result (the log's tail says why).
        """
        path = Path(self.job.result) if self.job is not None else None
        rc = self.proc.poll()  # before the file: a child that wrote it and exited is not taken for a failure
        if path is not None and path.exists():
            if self.seconds is None:
                self.seconds = time.perf_counter() - (self.submitted or self.started) - self.paused_seconds
            return json.loads(path.read_text())
        if rc is None:
            return None
        raise self._failure(rc, "no result")

    def wait(self, poll_s: float = 0.05) -> dict:
        """Block until the child has written its result; that result (see :meth:`poll`)."""
        while (result := self.poll()) is None:
            time.sleep(poll_s)
        return result

    def probe(self) -> dict | None:
        """Wait for the child to exit after its result; its probe (``probe.json``), None if it wrote none.

        Raises:
            BackgroundScoringError: it exited with a nonzero status (the log's tail says why).
        """
        rc = self.proc.wait()
        if rc != 0:
            raise self._failure(rc, "no probe")
        path = Path(self.job.result).with_name(PROBE_FILE) if self.job is not None else None
        return json.loads(path.read_text()) if path is not None and path.exists() else None

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


def run_job(cfg, job_path: Path, *, log=print) -> dict:
    """The child's work for the run config ``cfg``: load the run (world size 1), wait for the job, score,
    select and write the result (the stage may switch now), then probe and write ``probe.json``; returns
    the result with the probe."""
    from megatron_cropi.curriculum import steps
    from megatron_cropi.curriculum.probe import probe_projection_quality
    from megatron_cropi.influence.stores import PolicyScorer
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.wiring import build_scoring_model, pad_id_of, setup_run

    groups, prompts, tokenizer = setup_run(cfg)
    job = wait_for_job(job_path)
    t_start = time.perf_counter()
    model = build_scoring_model(cfg, groups, hf_dir=job.policy_hf)
    scorer = PolicyScorer(model, groups, build_projector(cfg.projection), cfg.scoring,
                          projection_seed=cfg.projection.seed, checkpoint_step=job.checkpoint_step,
                          pad_id=pad_id_of(tokenizer), progress=False)
    features = {name: Path(p) for name, p in job.features.items()}
    result: dict = {"stage": job.stage, "startup_seconds": time.perf_counter() - t_start, "score": {}}
    for name, store in job.stores.items():
        t0 = time.perf_counter()
        stats = steps.score_set(Path(store), features[name], scorer, sharded=name == "pool" and cfg.scoring.scale_out)
        log(steps.score_line(job.stage, name, stats))
        result["score"][name] = {**dataclasses.asdict(stats), "wall_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    selection = steps.select_stage(job.stage, layout=RunLayout(cfg.run.output_dir), pool=prompts.pool,
                                   cfg=steps.stage_selection(cfg.selection, True), seed=cfg.run.seed,
                                   features=features, pool_rollouts=Path(job.pool_rollouts))
    log(steps.select_line(job.stage, selection))
    result["select_seconds"] = time.perf_counter() - t0
    result["seconds"] = time.perf_counter() - t_start
    atomic_write_json(job.result, result)
    t0 = time.perf_counter()
    probe = probe_projection_quality(
        job.stage, features, scorer, stores={name: Path(p) for name, p in job.stores.items()},
        probe_prompts=cfg.curriculum.probe_prompts, max_params=cfg.curriculum.probe_max_params,
        max_target_prompts=cfg.selection.max_target_prompts, seed=cfg.run.seed)
    probe["seconds"] = time.perf_counter() - t0
    atomic_write_json(Path(job.result).with_name(PROBE_FILE), probe)
    return {**result, "probe": probe}
