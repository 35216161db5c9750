"""The background scorer's work: one stage's job (:func:`score_job`), done by a child of a one-process run
(:func:`run_job`, ``curriculum.background_scorer: child``) or by a scoring job of its own that serves a run
of any size (:func:`serve`, ``curriculum.background_scorer: external``).

The external scoring job is launched by the operator, on devices of its own, with the run's config::

    torchrun --nproc-per-node N [--nnodes ...] -m megatron_cropi.cli serve-scoring CONFIG [key=value ...]

Its world is its own: TP and PP as the config says, any data-parallel size (``N ÷ (TP × PP)``). It waits
for the run to start, checks that CONFIG as resolved is the run's (``background/config.yaml``, written by
the run; a difference is an error naming the keys), then serves, in the run directory's files::

    background/stage{m}/job.json      the run submits stage m's job (a new attempt id each time)
    background/stage{m}/taken.json    the job started on it (attempt, world size)
    background/stage{m}/result.json   features and selection written: the run switches to it
    background/stage{m}/probe.json    the projection probe, after the result
    background/stage{m}/error.json    the job failed (the run raises it): a one-process job goes on serving;
                                      in a larger one the failing rank writes it and exits, and torchrun
                                      stops the rest (the others may be inside a collective it left)
    background/serving.json           the job's heartbeat (owner, host, pid, world, time; every 5 s): a second
                                      job on the same run is refused while it is fresh (< 30 s), and the
                                      run and ``cropi status`` say when it has gone stale
    background/stop                   the run finished: the job exits 0

The run directory (with β's HF directory and the stores the jobs name) must be on a filesystem both
jobs see.

Every file names its attempt, so a restarted run (which submits again, with a new id) never takes an
earlier attempt's result; a job is served once per attempt, and a job whose result is already on disk is
not served again (a restarted scoring job). Everything a job does is what the run's own steps do
(:func:`~megatron_cropi.curriculum.steps.score_set`, :func:`~megatron_cropi.curriculum.steps.select_stage`,
:func:`~megatron_cropi.curriculum.probe.probe_projection_quality`), collective over the job's world; its
global rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import traceback
import uuid
from pathlib import Path

import yaml

from megatron_cropi.curriculum.background import (ERROR_FILE, PROBE_FILE, SERVING_FILE, STALE_S, STOP_FILE, TAKEN_FILE,
                                                  BackgroundJob, wait_for_job)
from megatron_cropi.utils.atomic import atomic_write_json
from megatron_cropi.utils.rank_zero import on_rank0, share_from_rank0

__all__ = ["ScoringServiceError", "config_differences", "roll_out_job", "run_job", "score_job", "serve"]


class ScoringServiceError(RuntimeError):
    """The scoring job cannot serve this run (its config differs from the run's)."""


def score_job(cfg, groups, prompts, tokenizer, job: BackgroundJob, *, log=print) -> dict:
    """Stage ``job.stage``'s work, collective over this process's world: roll the behaviour sets out when the
    job asks (:func:`roll_out_job`), score every feature set at the job's policy, select, write
    ``result.json`` (the stage may switch now), then probe and write ``probe.json``. Both files carry
    ``job.attempt``. Returns the result with the probe."""
    from megatron_cropi.curriculum import steps
    from megatron_cropi.curriculum.probe import probe_projection_quality
    from megatron_cropi.influence.stores import PolicyScorer
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.wiring import build_scoring_model, pad_id_of

    t_start = time.perf_counter()
    model = build_scoring_model(cfg, groups, hf_dir=job.policy_hf)
    rollouts = roll_out_job(cfg, groups, prompts, tokenizer, job, model, log=log) if job.rollouts_policy else None
    scorer = PolicyScorer(model, groups, build_projector(cfg.projection), cfg.scoring,
                          projection_seed=cfg.projection.seed, checkpoint_step=job.checkpoint_step,
                          pad_id=pad_id_of(tokenizer), progress=False)
    features = {name: Path(p) for name, p in job.features.items()}
    result: dict = {"stage": job.stage, "attempt": job.attempt, "score": {}}
    if rollouts is not None:
        result["rollouts"] = rollouts
    result["startup_seconds"] = time.perf_counter() - t_start - (rollouts["seconds"] if rollouts else 0.0)
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
    on_rank0(lambda: atomic_write_json(job.result, result))
    t0 = time.perf_counter()
    probe = probe_projection_quality(
        job.stage, features, scorer, stores={name: Path(p) for name, p in job.stores.items()},
        probe_prompts=cfg.curriculum.probe_prompts, max_params=cfg.curriculum.probe_max_params,
        max_target_prompts=cfg.selection.max_target_prompts, seed=cfg.run.seed)
    probe = {**probe, "seconds": time.perf_counter() - t0, "attempt": job.attempt}
    on_rank0(lambda: atomic_write_json(Path(job.result).with_name(PROBE_FILE), probe))
    return {**result, "probe": probe}


def roll_out_job(cfg, groups, prompts, tokenizer, job: BackgroundJob, model, *, log=print) -> dict:
    """``curriculum.background_rollouts``: the behaviour sets rolled out at the job's policy into its stores,
    as the run's own :func:`~megatron_cropi.curriculum.behaviour.roll_out_sets` does (β's sampling at stage 0,
    with its store reuse; the refresh's seed at a later stage), so the stores equal the run's. ``model``: the
    job's scoring model (the native sampler shares its weights; a list of virtual-pipeline chunks is not a
    sampler's model, so the policy is loaded once more for it). Returns ``{"sets": {label: record},
    "seconds": s}`` (records: :func:`~megatron_cropi.curriculum.behaviour.rolled_out_record`)."""
    from megatron_cropi.curriculum import behaviour
    from megatron_cropi.curriculum.reuse import reuse_sources
    from megatron_cropi.rewards.base import RewardFunction
    from megatron_cropi.rewards.config import reward_config_for
    from megatron_cropi.wiring import build_engine, build_policy_model

    t0 = time.perf_counter()
    policy = build_policy_model(cfg, groups, hf_dir=job.policy_hf) if isinstance(model, list) else model
    engine = build_engine(cfg, groups, tokenizer, model=policy, hf_dir=job.policy_hf)
    reward_fn = RewardFunction(reward_config_for(cfg.rollout.reward, cfg.data.kind))
    curriculum, records = cfg.curriculum, {}

    def on_set(label: str, recs: list, summary, seconds: float) -> None:
        records[label] = behaviour.rolled_out_record(recs, summary, seconds)
        log(behaviour.rollouts_line_of(label, records[label]))

    try:
        behaviour.roll_out_sets([s for s in behaviour.run_behaviour_sets(cfg, prompts) if s[0] in job.stores],
                                lambda name: Path(job.stores[name]),
                                stage=job.stage, base=cfg.rollout.sampling_params(cfg.run.seed), curriculum=curriculum,
                                rollout=cfg.rollout, engine=engine, reward_fn=reward_fn, tokenizer=tokenizer,
                                groups=groups, policy=job.rollouts_policy, on_set=on_set, log=log, reuse_from=(
                                    reuse_sources(cfg.run.output_dir, curriculum.reuse_rollouts_from)
                                    if job.stage == 0 else ()))
    finally:
        reward_fn.close()
        if hasattr(engine, "close"):
            engine.close()
    return {"sets": records, "seconds": time.perf_counter() - t0}


def run_job(cfg, job_path: Path, *, log=print) -> dict:
    """The child's work (``curriculum.background_scorer: child``): load the run (world size 1), wait for
    the job the parent submits to ``job_path``, do it (:func:`score_job`)."""
    from megatron_cropi.wiring import setup_run

    groups, prompts, tokenizer = setup_run(cfg)
    return score_job(cfg, groups, prompts, tokenizer, wait_for_job(job_path), log=log)


# keys a scoring job may hold otherwise than its run: how long the run waits for a job, and the job's own
# CPU threads, change nothing the job computes
JOB_IGNORED_KEYS = frozenset({"curriculum.background_wait_s", "run.num_threads"})


def config_differences(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (nested dicts), sorted; the keys of
    :data:`JOB_IGNORED_KEYS` are not compared."""
    keys = sorted(set(ours) | set(theirs))
    out = []
    for key in keys:
        a, b, name = ours.get(key), theirs.get(key), f"{prefix}{key}"
        if name in JOB_IGNORED_KEYS:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name} ({a!r} here, {b!r} in the run)")
    return out


def _next_job(root: Path, stages: int, served: set[tuple[int, str]]) -> tuple[str, str | None]:
    """Rank 0: ``("stop", None)``, ``("job", path)`` for the first stage whose job this process has not
    served and whose result is not on disk, or ``("idle", None)``."""
    if (root / STOP_FILE).exists():
        return "stop", None
    for stage in range(stages):
        path = root / f"stage{stage}" / "job.json"
        try:
            job = BackgroundJob.read(path)
        except (OSError, ValueError, TypeError):  # none yet, or being replaced (written atomically, read again)
            continue
        if (stage, job.attempt) in served:
            continue
        try:  # the run may remove it right now (a new submission)
            finished = json.loads(Path(job.result).read_text()).get("attempt") == job.attempt
        except (OSError, ValueError):
            finished = False
        if not finished:
            return "job", str(path)
    return "idle", None


HEARTBEAT_S = 5.0


class Heartbeat:
    """Rank 0 of a scoring job: ``background/serving.json`` rewritten every :data:`HEARTBEAT_S` seconds by a
    daemon thread (it beats while the job scores), and the claim that no other fresh job serves the run."""

    def __init__(self, root: Path, world: int):
        self.path, self.stop = root / SERVING_FILE, threading.Event()
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "world": world}

    def claim(self) -> None:
        """Raises ScoringServiceError when another job's heartbeat is fresh."""
        try:
            other = json.loads(self.path.read_text())
        except (OSError, ValueError):
            other = None
        if other and other.get("owner") != self.record["owner"] and time.time() - float(other.get("time", 0)) < STALE_S:
            raise ScoringServiceError(
                f"{self.path}: another scoring job serves this run (host {other.get('host')}, pid {other.get('pid')}, "
                f"heartbeat {time.time() - float(other['time']):.0f} s ago): stop it, or wait {STALE_S:.0f} s after it "
                "has stopped")
        self.beat()
        threading.Thread(target=self._run, daemon=True).start()

    def beat(self) -> None:
        atomic_write_json(self.path, {**self.record, "time": time.time()})

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except OSError:  # a full or unreachable disk: the next beat tries again
                pass


def serve(cfg, *, poll_s: float = 0.5, log=print, max_jobs: int | None = None) -> int:
    """Serve the run of ``cfg`` (its ``run.output_dir``) until it has finished; the number of jobs done.

    A collective over this process's world (torchrun's, or one process). Global rank 0 reads and writes
    the files and tells the other ranks what to do.

    Args:
        max_jobs: return after this many jobs (tests).

    Raises:
        ScoringServiceError: ``cfg`` as resolved is not the run's.
    """
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.wiring import setup_run

    groups, prompts, tokenizer = setup_run(cfg)
    say = log if groups.rank == 0 else (lambda msg: None)
    root = RunLayout(cfg.run.output_dir).background_root
    run_config = root / "config.yaml"
    say(f"[serve-scoring] world {groups.world_size} (TP {groups.tp_size}, PP {groups.pp_size}, DP {groups.dp_size}); "
        f"serving the run in {cfg.run.output_dir}")
    while not share_from_rank0(run_config.exists() if groups.rank == 0 else None):
        time.sleep(poll_s)

    heartbeat = Heartbeat(root, groups.world_size)

    def check() -> None:
        ours = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # as the run wrote its own
        differ = config_differences(ours, yaml.safe_load(run_config.read_text()))
        if differ:
            raise ScoringServiceError(f"{run_config}: this scoring job's config differs from the run's in "
                                      + "; ".join(differ[:8]) + ": pass the run's config and overrides")
        heartbeat.claim()
    on_rank0(check)
    served: set[tuple[int, str]] = set()
    try:
        while max_jobs is None or len(served) < max_jobs:
            what, path = on_rank0(lambda: _next_job(root, cfg.curriculum.stages, served))
            if what == "stop":
                say("[serve-scoring] the run has finished")
                break
            if what == "idle":
                time.sleep(poll_s)
                continue
            job = on_rank0(lambda: BackgroundJob.read(path))
            served.add((job.stage, job.attempt))
            _serve_one(cfg, groups, prompts, tokenizer, job, Path(path).parent, say)
    finally:
        heartbeat.stop.set()
    return len(served)


def _serve_one(cfg, groups, prompts, tokenizer, job: BackgroundJob, here: Path, say) -> None:
    """One job: ``taken.json``, the work, or ``error.json`` (a one-process job goes on; a larger one's failing
    rank re-raises after writing it, since the other ranks may wait in a collective it will not join)."""
    on_rank0(lambda: atomic_write_json(here / TAKEN_FILE, {"attempt": job.attempt, "world": groups.world_size,
                                                          "time": time.time()}))
    say(f"[serve-scoring] stage {job.stage}: attempt {job.attempt}")
    try:
        score_job(cfg, groups, prompts, tokenizer, job, log=say)
    except Exception as err:  # noqa: BLE001 - the run must learn it
        tail = traceback.format_exc().strip().splitlines()[-12:]
        atomic_write_json(here / ERROR_FILE, {"attempt": job.attempt, "traceback": tail,
                                              "error": f"rank {groups.rank}: {type(err).__name__}: {err}"})
        print(f"[serve-scoring] stage {job.stage} failed on rank {groups.rank}: {type(err).__name__}: {err}", flush=True)
        if groups.world_size > 1:
            raise
