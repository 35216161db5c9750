"""``curriculum.background_scoring``: a stage's scoring and selection in a second process while it trains.

Oracles are runs that score in the foreground (the controller's own steps):

* switched before the stage's first step (``CROPI_BACKGROUND_SWITCH_AT=0``), a background run is the
  foreground run: the same feature stores, selections, evaluations and final parameters;
* switched one step into each stage, a run killed at injected points and by SIGKILL (with its scorer
  running), then restarted, ends where the uninterrupted run with the same switch ends, and no scorer
  outlives a killed parent;
* left to itself (no forced switch), the run records where it switched, trains on the pool before that,
  and keeps the scorer's time off the run clock (``background_clock``); the scorer's probe comes after its
  selection and is recorded at the stage's end.
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


def _write(tmp: Path, out: Path, **changes) -> Path:
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    path = tmp / f"cfg-{out.name}.yaml"
    path.write_text(yaml.safe_dump(tiny_curriculum_config(str(out), **changes)))
    return path


def _cropi(cfg: Path, *, fault=None, switch_at=None):
    from megatron_cropi.testing.cli import run_cli

    old = os.environ.get(SWITCH_AT)
    if switch_at is not None:
        os.environ[SWITCH_AT] = str(switch_at)
    try:
        return run_cli(["run", str(cfg)], fault=fault, timeout=300)
    finally:
        if old is None:
            os.environ.pop(SWITCH_AT, None)
        else:
            os.environ[SWITCH_AT] = old


def _outcome(out: Path) -> dict:
    from megatron_cropi.testing.cli import run_outcome

    return run_outcome(out)


def _assert_same(got: dict, ref: dict) -> None:
    assert got["selections"] == ref["selections"]
    assert got["evals"] == ref["evals"]
    assert got["params"].keys() == ref["params"].keys()
    for name, tensor in ref["params"].items():
        assert bool((got["params"][name] == tensor).all()), name


def _state(out: Path) -> dict:
    return json.loads((out / "state.json").read_text())


def _scorers_of(out: Path) -> list[int]:
    """Pids of background scorers working for the run in ``out``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"megatron_cropi.commands.background_scorer" in cmd and any(str(out).encode() in c for c in cmd):
                pids.append(int(proc.name))
    return pids


@pytest.mark.timeout(600)
def test_switched_at_the_stage_start_it_is_the_foreground_run(tmp_path):
    from megatron_cropi.testing.cli import assert_same_features

    fg, bg = tmp_path / "fg", tmp_path / "bg"
    rc, log = _cropi(_write(tmp_path, fg))
    assert rc == 0, log[-3000:]
    rc, log = _cropi(_write(tmp_path, bg, **{"curriculum.background_scoring": True}), switch_at=0)
    assert rc == 0, log[-3000:]
    assert "[background] stage 0" in log and "trains from step 0 on" in log, log[-3000:]
    assert_same_features(fg, bg)
    _assert_same(_outcome(bg), _outcome(fg))
    state = _state(bg)
    assert state["info"]["stage0/select"]["switch_step"] == 0 and state["info"]["stage1/select"]["switch_step"] == 3
    # the scorer's work is beside the clock; on it, only exporting θ_1 for stage 1's scorer (stage 0 reads β's)
    assert state["background_clock"]["scoring"] > 0
    assert 0 < state["clock"]["scoring"] < state["background_clock"]["scoring"]
    assert not _scorers_of(bg)
    # each evaluation counts the scorers' seconds so far once: never falling, never above the final total
    # (a scorer whose result is recorded stays a handle until its stage ends; it is not counted twice)
    seen = [json.loads(x)["background_seconds"] for x in (bg / "metrics" / "eval.jsonl").read_text().splitlines() if x]
    assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:])), seen
    assert seen[-1] == pytest.approx(sum(state["background_clock"].values())), seen


@pytest.mark.timeout(600)
def test_with_its_rollouts_in_the_scorer_it_is_the_foreground_run(tmp_path):
    """``curriculum.background_rollouts``: β's rollouts (stage 0) and the refresh's at θ_1 (stage 1) made by
    the scorers equal the run's own: the same stores, features, selections, evaluations and parameters; their
    seconds are beside the clock, and the run trains from its first step without rolling out."""
    from megatron_cropi.testing.cli import assert_same_features

    fg, bg = tmp_path / "fg", tmp_path / "bg"
    refresh = {"curriculum.refresh_behaviour_every": 1}
    rc, log = _cropi(_write(tmp_path, fg, **refresh))
    assert rc == 0, log[-3000:]
    rc, log = _cropi(_write(tmp_path, bg, **refresh, **{"curriculum.background_scoring": True,
                                                         "curriculum.background_rollouts": True}), switch_at=0)
    assert rc == 0, log[-3000:]
    assert "[rollouts] pool:" in log and "[background]" in log.split("[rollouts] pool:")[1].splitlines()[0], log[-3000:]
    for store in ["rollouts/pool", "rollouts/stage1/pool"]:
        names = sorted(p.relative_to(fg / store) for p in (fg / store).rglob("*") if p.is_file())
        assert names, store
        for name in names:
            if name.suffix != ".json":  # headers and indexes carry timestamps; the rows are the data
                assert (bg / store / name).read_bytes() == (fg / store / name).read_bytes(), (store, name)
    assert_same_features(fg, bg)
    _assert_same(_outcome(bg), _outcome(fg))
    state = _state(bg)
    assert "rollouts" not in state["clock"] and state["background_clock"]["rollouts"] > 0
    assert state["info"]["rollouts"]["background"] is True
    assert state["info"]["stage1/refresh"]["policy_step"] == 3 and state["info"]["stage1/refresh"]["background"]


@pytest.mark.timeout(900)
def test_killed_and_restarted_it_ends_where_the_uninterrupted_run_ends(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # a checkpoint after every step, so that each killed run gets one step further: resumes before, at and
    # after each stage's switch
    changes = {"curriculum.background_scoring": True, "grpo.checkpoint.save_interval": 1}
    cfg_a = _write(tmp_path, a, **changes)
    rc, log = _cropi(cfg_a, switch_at=1)
    assert rc == 0, log[-3000:]
    ref = _outcome(a)
    assert [_state(a)["info"][f"stage{m}/select"]["switch_step"] for m in (0, 1)] == [1, 4]

    cfg_b = _write(tmp_path, b, **changes)
    from megatron_cropi.testing.cli import cli_env

    # SIGKILL while stage 0's scorer runs: the scorer dies with its parent
    env = dict(cli_env(), **{SWITCH_AT: "1"})
    proc = subprocess.Popen([sys.executable, "-m", "megatron_cropi.cli", "run", str(cfg_b)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (b / "background" / "stage0" / "job.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert _scorers_of(b), "no background scorer was running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while _scorers_of(b) and time.time() < deadline:
        time.sleep(0.1)
    assert not _scorers_of(b), "the background scorer outlived its killed parent"
    for fault in ("background:switch", "train:step", "train:step", "train:step", "background:switch", "train:step"):
        rc, log = _cropi(cfg_b, fault=fault, switch_at=1)
        assert rc in (0, 17), log[-3000:]
    rc, log = _cropi(cfg_b, switch_at=1)
    assert rc == 0, log[-3000:]
    _assert_same(_outcome(b), ref)
    assert not _scorers_of(b)


@pytest.mark.timeout(600)
def test_unforced_it_records_the_switch_and_keeps_the_scorer_off_the_clock(tmp_path):
    out = tmp_path / "run"
    cfg = _write(tmp_path, out, **{"curriculum.background_scoring": True, "curriculum.steps_per_stage": 12,
                                   "curriculum.stages": 1, "curriculum.eval.every": 6, "curriculum.probe_prompts": 8})
    rc, log = _cropi(cfg)
    assert rc == 0, log[-3000:]
    state = _state(out)
    info = state["info"]["stage0/select"]
    assert info["background"] is True and info["background_seconds"] > 0
    switch = info["switch_step"]
    assert switch is None or 0 <= switch < 12
    assert state["background_clock"]["scoring"] > 0
    # on the clock: nothing of the scorer's, unless the stage ended first and waited for it
    assert ("scoring" in state["clock"]) == (switch is None)
    last = [json.loads(x) for x in (out / "metrics" / "eval.jsonl").read_text().splitlines() if x][-1]
    # the last evaluation counts the scorer's seconds so far: all of them once it has switched
    if switch is not None:
        assert last["background_seconds"] == pytest.approx(sum(state["background_clock"].values()))
    else:
        assert 0 < last["background_seconds"] <= sum(state["background_clock"].values())
    assert (out / "background" / "stage0" / "log").exists()
    # the probe is a report, not an input of the selection: the scorer wrote its result (the switch) first,
    # then probed, and the parent recorded that probe at the stage's end
    job = out / "background" / "stage0"
    assert "probe" not in json.loads((job / "result.json").read_text())
    assert (job / "probe.json").stat().st_mtime_ns >= (job / "result.json").stat().st_mtime_ns
    probe = state["info"]["stage0/probe"]
    assert probe["probe_prompts"] == 8 and -1 <= probe["spearman"] <= 1, probe
    assert json.loads((job / "probe.json").read_text())["spearman"] == probe["spearman"]
