"""The external scoring job's file protocol (``curriculum.background_scorer: external``), without processes:
the run's handle reads only its own attempt's files, the job picks what it has not served, and a job
whose config is not the run's is refused naming the keys (through ``cropi serve-scoring``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from megatron_cropi.curriculum.background import (ERROR_FILE, PROBE_FILE, SERVING_FILE, STOP_FILE, TAKEN_FILE,
                                                  BackgroundJob, BackgroundScoringError, ExternalScorer)
from megatron_cropi.curriculum.scoring_service import _next_job, config_differences
from megatron_cropi.utils.atomic import atomic_write_json


def _job(root, stage: int, attempt: str) -> BackgroundJob:
    here = root / f"stage{stage}"
    return BackgroundJob(stage=stage, policy_hf="hf", checkpoint_step=0, stores={}, features={}, pool_rollouts="p",
                         result=str(here / "result.json"), attempt=attempt)


def test_the_handle_takes_only_its_own_attempts_result_probe_and_error(tmp_path):
    here = tmp_path / "stage0"
    here.mkdir()
    for name in ("result.json", PROBE_FILE, ERROR_FILE, TAKEN_FILE):  # an earlier attempt's files
        atomic_write_json(here / name, {"attempt": "old", "error": "old failure"})
    scorer = ExternalScorer(0, here)
    scorer.submit(_job(tmp_path, 0, "new"))
    assert sorted(p.name for p in here.iterdir()) == ["job.json"]  # the earlier files are gone
    assert BackgroundJob.read(here / "job.json").attempt == "new"
    assert scorer.poll() is None and not scorer.taken()
    atomic_write_json(here / "result.json", {"attempt": "old", "score": {}})  # an old job finishing late
    assert scorer.poll() is None
    atomic_write_json(here / TAKEN_FILE, {"attempt": "new", "world": 2})
    atomic_write_json(here / "result.json", {"attempt": "new", "score": {}, "select_seconds": 1.0})
    got = scorer.poll()
    assert got["attempt"] == "new" and got["background_seconds"] == scorer.seconds >= 0 and scorer.taken()
    atomic_write_json(here / PROBE_FILE, {"attempt": "new", "spearman": 0.9})
    assert scorer.poll_probe()["spearman"] == 0.9
    with scorer.paused():  # not paused: its devices are its own
        pass
    scorer.kill()


def test_the_handle_raises_its_attempts_error(tmp_path):
    here = tmp_path / "stage1"
    here.mkdir()
    scorer = ExternalScorer(1, here)
    scorer.submit(_job(tmp_path, 1, "a1"))
    atomic_write_json(here / ERROR_FILE, {"attempt": "a0", "error": "stale"})
    assert scorer.poll() is None and scorer.poll_probe() is None
    atomic_write_json(here / ERROR_FILE, {"attempt": "a1", "error": "ValueError: bad store", "traceback": ["x", "y"]})
    with pytest.raises(BackgroundScoringError, match="failed stage 1: ValueError: bad store"):
        scorer.poll()
    # failed in its probe, after the result: the result stands, the probe raises
    atomic_write_json(here / "result.json", {"attempt": "a1", "score": {}})
    assert scorer.poll()["attempt"] == "a1"
    with pytest.raises(BackgroundScoringError, match="bad store"):
        scorer.poll_probe()


def test_the_job_serves_each_attempt_once_and_stops_when_the_run_has(tmp_path):
    assert _next_job(tmp_path, 3, set()) == ("idle", None)
    for stage, attempt in ((0, "a"), (2, "c")):
        (tmp_path / f"stage{stage}").mkdir()
        _job(tmp_path, stage, attempt).write(tmp_path / f"stage{stage}" / "job.json")
    assert _next_job(tmp_path, 3, set()) == ("job", str(tmp_path / "stage0" / "job.json"))
    assert _next_job(tmp_path, 3, {(0, "a")}) == ("job", str(tmp_path / "stage2" / "job.json"))
    # a result of this attempt on disk (a restarted job): not again; of an earlier one: served
    atomic_write_json(tmp_path / "stage2" / "result.json", {"attempt": "c"})
    assert _next_job(tmp_path, 3, {(0, "a")}) == ("idle", None)
    atomic_write_json(tmp_path / "stage2" / "result.json", {"attempt": "b"})
    assert _next_job(tmp_path, 3, {(0, "a")})[0] == "job"
    (tmp_path / STOP_FILE).write_text("done\n")
    assert _next_job(tmp_path, 3, set()) == ("stop", None)


def test_config_differences_name_dotted_keys():
    ours = {"grpo": {"optim": {"lr": 1e-3, "wd": 0.0}}, "run": {"seed": 1}, "extra": 1}
    theirs = {"grpo": {"optim": {"lr": 3e-4, "wd": 0.0}}, "run": {"seed": 1}}
    assert config_differences(ours, theirs) == ["extra (1 here, None in the run)",
                                                "grpo.optim.lr (0.001 here, 0.0003 in the run)"]
    assert config_differences(ours, ours) == []


def _tiny(tmp_path, **changes):
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    cfg = tiny_curriculum_config(str(tmp_path / "run"), **changes)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(300)
def test_serve_scoring_refuses_a_config_that_is_not_the_runs_and_a_run_without_an_external_scorer(tmp_path):
    from megatron_cropi.run_config import load_run_config
    from megatron_cropi.testing.cli import run_cli

    external = {"curriculum.background_scoring": True, "curriculum.background_scorer": "external"}
    run_cfg = load_run_config(_tiny(tmp_path, **external))
    root = tmp_path / "run" / "background"
    root.mkdir(parents=True)
    theirs = yaml.safe_load(yaml.safe_dump(run_cfg.to_dict(), sort_keys=False))
    theirs["grpo"]["optim"]["lr"] = 1.0e-4
    (root / "config.yaml").write_text(yaml.safe_dump(theirs, sort_keys=False))
    rc, out = run_cli(["serve-scoring", str(_tiny(tmp_path, **external))], timeout=240)
    assert rc == 2 and "grpo.optim.lr (0.0003 here, 0.0001 in the run)" in out, out[-2000:]
    assert "pass the run's config and overrides" in out
    rc, out = run_cli(["serve-scoring", str(_tiny(tmp_path))], timeout=240)
    assert rc == 2 and "curriculum.background_scorer external" in out, out[-2000:]


def _run_dir_for_a_job(tmp_path):
    """A run directory as the run leaves it for its scoring job: its resolved config under ``background/``."""
    from megatron_cropi.run_config import load_run_config

    cfg_path = _tiny(tmp_path, **{"curriculum.background_scoring": True, "curriculum.background_scorer": "external"})
    root = tmp_path / "run" / "background"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(load_run_config(cfg_path).to_dict(), sort_keys=False))
    return cfg_path, root


@pytest.mark.timeout(300)
def test_a_second_scoring_job_is_refused_while_the_first_ones_heartbeat_is_fresh(tmp_path):
    import time

    from megatron_cropi.testing.cli import run_cli

    cfg_path, root = _run_dir_for_a_job(tmp_path)
    atomic_write_json(root / SERVING_FILE, {"owner": "other", "host": "node7", "pid": 4242, "time": time.time()})
    rc, out = run_cli(["serve-scoring", str(cfg_path)], timeout=240)
    assert rc == 2 and "another scoring job serves this run (host node7, pid 4242" in out, out[-2000:]
    # a stale heartbeat (a job that died) does not hold the run: this one claims it, and stops with the run
    atomic_write_json(root / SERVING_FILE, {"owner": "other", "host": "node7", "pid": 4242, "time": time.time() - 60})
    (root / STOP_FILE).write_text("done\n")
    rc, out = run_cli(["serve-scoring", str(cfg_path)], timeout=240)
    assert rc == 0 and "the run has finished" in out, out[-2000:]
    beat = json.loads((root / SERVING_FILE).read_text())
    assert beat["owner"] != "other" and beat["world"] == 1


@pytest.mark.timeout(300)
def test_a_failed_job_is_reported_to_the_run_and_a_one_process_job_serves_on(tmp_path):
    import subprocess
    import sys
    import time

    from megatron_cropi.testing.cli import cli_env

    cfg_path, root = _run_dir_for_a_job(tmp_path)
    (root / "stage0").mkdir()
    scorer = ExternalScorer(0, root / "stage0")
    job = _job(root, 0, "a1")
    scorer.submit(dataclasses.replace(job, policy_hf=str(tmp_path / "no-such-hf-dir")))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_cropi.cli", "serve-scoring", str(cfg_path)],
                                stdout=out, stderr=subprocess.STDOUT, env=cli_env())
    try:
        deadline = time.monotonic() + 200
        while not (root / "stage0" / ERROR_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(BackgroundScoringError, match="failed stage 0: rank 0: .*no-such-hf-dir"):
            scorer.poll()
        assert proc.poll() is None, log.read_text()[-2000:]  # still serving
        (root / STOP_FILE).write_text("done\n")
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def _waiting_run(limit: float):
    from types import SimpleNamespace

    notes: list[str] = []
    run = SimpleNamespace(cfg=SimpleNamespace(curriculum=SimpleNamespace(background_wait_s=limit)), is_rank0=True,
                          log=notes.append)
    return run, notes


def _beat(root, age: float = 0.0):
    import time

    atomic_write_json(root / SERVING_FILE, {"owner": "job", "time": time.time() - age})


def test_a_run_stops_waiting_for_a_job_nobody_serves_and_waits_for_one_that_beats(tmp_path, monkeypatch):
    from megatron_cropi.curriculum import background
    from megatron_cropi.curriculum.background import BackgroundWaitError
    from megatron_cropi.curriculum.background_stage import _wait_together

    monkeypatch.setattr(background, "STALE_S", 0.1)  # a heartbeat unchanged this long, as this host sees it

    here = tmp_path / "stage0"
    here.mkdir()
    scorer = ExternalScorer(0, here)
    scorer.submit(_job(tmp_path, 0, "a"))
    run, notes = _waiting_run(0.3)
    # nobody took the job: the wait ends, naming the key and the command
    with pytest.raises(BackgroundWaitError, match=r"no scoring job took it.*serve-scoring.*background_wait_s"):
        _wait_together(run, scorer, scorer.poll, poll_s=0.01)
    # taken, but the job's heartbeat stopped changing: the same, naming how long. Its time stamp is not
    # compared with this host's clock: one far in the past is fresh when it has just changed
    atomic_write_json(here / TAKEN_FILE, {"attempt": "a", "world": 1})
    _beat(tmp_path, age=1e6)
    assert scorer.serving()
    with pytest.raises(BackgroundWaitError, match=r"heartbeat has not changed for \d+ s"):
        _wait_together(run, scorer, scorer.poll, poll_s=0.01)
    assert not scorer.serving()
    # for the probe the run gives up without an error: its selection stands
    assert _wait_together(run, scorer, scorer.poll_probe, poll_s=0.01, give_up=True) is None
    assert "no scoring job served" in notes[-1]
    # a job that beats is waited for past the limit, however long it scores
    calls = []

    def scoring():
        calls.append(1)
        _beat(tmp_path)
        if len(calls) == 60:  # ~0.6 s: twice the limit
            atomic_write_json(here / "result.json", {"attempt": "a", "score": {}})
        return scorer.poll()

    assert _wait_together(run, scorer, scoring, poll_s=0.01)["attempt"] == "a"


def test_without_a_limit_the_run_waits_for_a_job_launched_late(tmp_path):
    import threading

    from megatron_cropi.curriculum.background_stage import _wait_together

    here = tmp_path / "stage1"
    here.mkdir()
    scorer = ExternalScorer(1, here)
    scorer.submit(_job(tmp_path, 1, "b"))
    run, _ = _waiting_run(0.0)
    late = threading.Timer(0.5, lambda: atomic_write_json(here / "result.json", {"attempt": "b", "score": {}}))
    late.start()
    assert _wait_together(run, scorer, scorer.poll, poll_s=0.01)["attempt"] == "b"


def test_a_restarted_run_adopts_the_attempt_of_the_same_work_unless_it_failed(tmp_path):
    here = tmp_path / "stage0"
    here.mkdir()
    ExternalScorer(0, here).submit(_job(tmp_path, 0, "first"))
    atomic_write_json(here / TAKEN_FILE, {"attempt": "first", "world": 1})
    atomic_write_json(here / "result.json", {"attempt": "first", "score": {}})
    # the restarted run asks for the same work under a new id: it keeps the first attempt and its result
    again = ExternalScorer(0, here)
    again.submit(_job(tmp_path, 0, "second"))
    assert again.job.attempt == "first" and again.taken() and again.poll()["attempt"] == "first"
    assert BackgroundJob.read(here / "job.json").attempt == "first"
    # other work (another checkpoint) is a new attempt; the earlier files go
    other = ExternalScorer(0, here)
    other.submit(dataclasses.replace(_job(tmp_path, 0, "third"), checkpoint_step=7))
    assert other.job.attempt == "third" and not other.taken() and other.poll() is None
    assert sorted(p.name for p in here.iterdir()) == ["job.json"]
    # a failed attempt is not adopted
    atomic_write_json(here / ERROR_FILE, {"attempt": "third", "error": "boom"})
    last = ExternalScorer(0, here)
    last.submit(dataclasses.replace(_job(tmp_path, 0, "fourth"), checkpoint_step=7))
    assert last.job.attempt == "fourth" and not (here / ERROR_FILE).exists()


def test_a_job_may_hold_another_wait_limit_and_thread_count_than_its_run():
    ours = {"curriculum": {"background_wait_s": 60.0, "stages": 2}, "run": {"num_threads": 8}}
    theirs = {"curriculum": {"background_wait_s": 1800.0, "stages": 3}, "run": {"num_threads": 1}}
    assert config_differences(ours, theirs) == ["curriculum.stages (2 here, 3 in the run)"]
