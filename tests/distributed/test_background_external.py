"""``curriculum.background_scorer: external``: a run of two processes (TP = 2) whose scoring and selection
an external scoring job (``cropi serve-scoring``, launched apart with torchrun, two processes of its own)
does while the run trains.

Oracle: the same run scoring in the foreground (the controller's own steps). Switched before each stage's
first step (``CROPI_BACKGROUND_SWITCH_AT=0``), the external job's run is that run: the same feature stores,
selections, evaluations and final parameters. The job takes each stage's job once, and stops when the run
has finished.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

SWITCH_AT = "CROPI_BACKGROUND_SWITCH_AT"
TP2 = {"parallel.tensor_model_parallel_size": 2}


def _write(tmp: Path, out: Path, **changes) -> Path:
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    path = tmp / f"cfg-{out.name}.yaml"
    path.write_text(yaml.safe_dump(tiny_curriculum_config(str(out), **changes)))
    return path


def _launch(args: list[str], log: Path, nproc: int) -> subprocess.Popen:
    """``[torchrun --nproc-per-node N] -m megatron_cropi.cli ARGS`` in a session of its own (:func:`_stop` ends
    the launcher and its workers together)."""
    from megatron_cropi.testing.cli import cli_env
    from megatron_cropi.utils.net import free_port

    cmd = [sys.executable]
    if nproc > 1:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc), "--master-port",
               str(free_port())]
    with open(log, "w") as out:
        return subprocess.Popen([*cmd, "-m", "megatron_cropi.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=cli_env(), start_new_session=True)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.timeout(900)
def test_an_external_scoring_job_serves_a_tp2_run_as_foreground_scoring_would(tmp_path):
    from megatron_cropi.testing.cli import assert_same_features, run_cli, run_outcome

    fg, bg = tmp_path / "fg", tmp_path / "bg"
    rc, log = run_cli(["run", str(_write(tmp_path, fg, **TP2))], nproc=2, timeout=400)
    assert rc == 0, log[-3000:]
    cfg = _write(tmp_path, bg, **TP2, **{"curriculum.background_scoring": True,
                                         "curriculum.background_scorer": "external",
                                         "curriculum.reuse_rollouts_from": str(fg)})
    service_log = tmp_path / "serve.log"
    service = _launch(["serve-scoring", str(cfg)], service_log, nproc=2)  # as an operator launches it
    os.environ[SWITCH_AT] = "0"
    try:
        rc, log = run_cli(["run", str(cfg)], nproc=2, timeout=500)
        assert rc == 0, log[-3000:] + "\n--- serve-scoring:\n" + service_log.read_text()[-3000:]
        assert service.wait(timeout=120) == 0, service_log.read_text()[-3000:]  # the run's `stop` ends it
    finally:
        os.environ.pop(SWITCH_AT, None)
        _stop(service)
    served = service_log.read_text()
    assert "[serve-scoring] world 2 (TP 2, PP 1, DP 1)" in served and "the run has finished" in served, served
    assert "external scoring job" in log and "trains from step 0 on" in log, log[-3000:]
    assert_same_features(fg, bg)
    for stage in (0, 1):
        taken = json.loads((bg / "background" / f"stage{stage}" / "taken.json").read_text())
        result = json.loads((bg / "background" / f"stage{stage}" / "result.json").read_text())
        assert taken["world"] == 2 and taken["attempt"] == result["attempt"] != ""
        assert served.count(f"[serve-scoring] stage {stage}: attempt") == 1, served
    got, ref = run_outcome(bg), run_outcome(fg)
    assert got["selections"] == ref["selections"] and got["evals"] == ref["evals"]
    for name, tensor in ref["params"].items():
        assert bool((got["params"][name] == tensor).all()), name
    state = json.loads((bg / "state.json").read_text())
    assert state["info"]["stage0/select"]["switch_step"] == 0 and state["info"]["stage1/select"]["switch_step"] == 3
    assert state["background_clock"]["scoring"] > 0 and "stage1/probe" in state["done"]
    assert (bg / "background" / "stop").exists()


@pytest.mark.timeout(900)
def test_left_to_itself_a_two_rank_run_is_served_by_a_one_process_job_launched_late(tmp_path):
    """DP = 2, no forced switch: rank 0 asks the job's files before every step and shares the answer, and
    the waits for the job are loops of such polls; the scoring job (one process: its own data-parallel
    size) is launched only once the run has submitted stage 0's job. Stage 0's selection (at β, as every
    run's) equals the foreground run's; each recorded switch lies in its stage (or none: it came after)."""
    from megatron_cropi.selection.stored import read_selection
    from megatron_cropi.testing.cli import run_cli

    fg, bg = tmp_path / "fg", tmp_path / "bg"
    rc, log = run_cli(["run", str(_write(tmp_path, fg))], nproc=2, timeout=400)
    assert rc == 0, log[-3000:]
    cfg = _write(tmp_path, bg, **{"curriculum.background_scoring": True, "curriculum.background_scorer": "external",
                                  "curriculum.reuse_rollouts_from": str(fg), "curriculum.steps_per_stage": 6})
    run_log = tmp_path / "run.log"
    run = _launch(["run", str(cfg)], run_log, nproc=2)
    service = None
    try:
        job = bg / "background" / "stage0" / "job.json"
        deadline = time.monotonic() + 300
        while not job.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.exists(), run_log.read_text()[-3000:]
        service = _launch(["serve-scoring", str(cfg)], tmp_path / "serve.log", nproc=1)
        assert run.wait(timeout=500) == 0, run_log.read_text()[-3000:] + (tmp_path / "serve.log").read_text()[-2000:]
        assert service.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        _stop(run)
        _stop(service)
    served = (tmp_path / "serve.log").read_text()
    assert "[serve-scoring] world 1 (TP 1, PP 1, DP 1)" in served, served
    assert read_selection(bg / "selections" / "stage0.json").prompt_ids == \
        read_selection(fg / "selections" / "stage0.json").prompt_ids
    state = json.loads((bg / "state.json").read_text())
    for stage in (0, 1):
        switch = state["info"][f"stage{stage}/select"]["switch_step"]
        assert switch is None or stage * 6 <= switch <= stage * 6 + 6, state["info"]
        assert f"stage{stage}/probe" in state["done"]
