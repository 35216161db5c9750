"""``curriculum.background_scoring``'s parts: the prompt set in force around a switch, the refusals that name
the key, the scorer's pause during evaluation, and the curriculum benchmark's core tickets (a run with a
scorer never shares a core with another run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.curriculum.background import BackgroundScorer
from megatron_cropi.curriculum.background_stage import prompts_in_force
from megatron_cropi.dryrun import DryRunError, dry_run
from megatron_cropi.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, **sections) -> RunConfig:
    d = {"run": {"output_dir": str(tmp_path / "run")}, "model": {"preset": "tiny"},
         "selection": {"policy": "cropi"}, "curriculum": {"background_scoring": True}}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return from_dict(RunConfig, d)


def test_the_set_in_force_is_the_pool_up_to_the_switch_and_the_selection_after_it():
    pool, selected = list("abcdef"), list("bd")
    # checkpoint step_N holds the data position of the set step N drew from
    assert [prompts_in_force(pool, selected, 3, n) for n in range(1, 6)] == [pool, pool, pool, selected, selected]
    assert prompts_in_force(pool, selected, None, 9) == pool  # the selection came after the stage's end
    assert prompts_in_force(pool, None, None, 2) == pool  # the scorer never finished
    assert prompts_in_force(pool, selected, 0, 1) == selected  # switched before the first step


@pytest.mark.parametrize("sections, fragment", [
    ({"selection": {"policy": "random"}}, "selection.policy random makes no scoring"),
    ({"curriculum": {"background_scoring": True, "trainer": {"kind": "external", "command": "cp -r {checkpoint_in} {checkpoint_out}"}}},
     "curriculum.trainer.kind external"),
    ({"scoring": {"shortlist": {"fraction": 0.5}}}, "scoring.shortlist is on"),
    ({"parallel": {"tensor_model_parallel_size": 2}}, "TP and PP must be 1"),
])
def test_combinations_it_cannot_serve_are_refused_naming_the_key(tmp_path, sections, fragment):
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, **sections)
    assert "curriculum.background_scoring" in str(info.value) and fragment in str(info.value)


def test_the_dry_run_refuses_more_than_one_process(tmp_path):
    cfg = _cfg(tmp_path, grpo={"prompts_per_step": 8, "micro_batch_prompts": 4})
    dry_run(cfg, world_size=1)
    with pytest.raises(DryRunError, match="curriculum.background_scorer child needs one process") as info:
        dry_run(cfg, world_size=2)
    assert "background_scorer external" in str(info.value)


def test_an_external_scorer_serves_any_world_and_layout(tmp_path):
    cfg = _cfg(tmp_path, grpo={"prompts_per_step": 8, "micro_batch_prompts": 4},
               parallel={"tensor_model_parallel_size": 2}, curriculum={"background_scorer": "external"})
    dry_run(cfg, world_size=4)  # TP 2 × DP 2: no refusal
    with pytest.raises(ConfigError, match="curriculum.background_scorer") as info:
        _cfg(tmp_path, curriculum={"background_scorer": "sidecar"})
    assert "'sidecar'" in str(info.value) or "sidecar" in str(info.value)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_the_scorer_is_stopped_while_paused_and_its_pause_is_not_its_time(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    scorer = BackgroundScorer(0, tmp_path / "job.json", proc, tmp_path / "log")
    try:
        with scorer.paused():
            time.sleep(0.3)
            assert _state(proc.pid) == "T"  # stopped
            time.sleep(0.3)
        time.sleep(0.1)
        assert _state(proc.pid) in ("S", "R")
        assert scorer.paused_seconds >= 0.6
    finally:
        scorer.kill()
    assert proc.poll() is not None


def _bench():
    spec = importlib.util.spec_from_file_location("curriculum_benchmark_tickets", ROOT / "benchmarks" / "curriculum.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_with_a_scorer_take_both_cores_in_order():
    from concurrent.futures import ThreadPoolExecutor

    bench = _bench()
    assert bench.cores_of({"curriculum": {"background_scoring": True}}) == 2
    assert bench.cores_of({"curriculum": {}}) == 1
    tickets, lock = bench.CoreTickets(2), threading.Lock()
    running, events = set(), []

    def job(name: str, cores: int):
        with lock:
            running.add(name)
            events.append((name, frozenset(running)))
        time.sleep(0.05)
        with lock:
            running.discard(name)

    jobs = [("full0", 1), ("ds0", 1), ("bg0", 2), ("full1", 1), ("ds1", 1), ("bg1", 2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(tickets.run, tickets.ticket(), cores, job, name, cores) for name, cores in jobs]
        for fut in futures:
            fut.result()
    assert [name for name, _ in events] == [name for name, _ in jobs]  # started in order
    for name, others in events:
        if name.startswith("bg"):
            assert others == {name}, others  # alone on the machine


def test_background_rollouts_without_background_scoring_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"curriculum\.background_rollouts.*needs curriculum\.background_scoring"):
        _cfg(tmp_path, curriculum={"background_scoring": False, "background_rollouts": True})
    assert _cfg(tmp_path, curriculum={"background_rollouts": True}).curriculum.background_rollouts
