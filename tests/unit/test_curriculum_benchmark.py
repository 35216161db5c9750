"""``benchmarks/curriculum.py``'s arithmetic (first crossing, ratios, intervals) against hand-worked
records, and its warm-up retry: a β below the threshold is replaced by a warm-up with another batch seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("curriculum_benchmark", ROOT / "benchmarks" / "curriculum.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["curriculum_benchmark"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def _records(values, clock_per_step=1.5):
    return [{"step": 10 * i, "clock_seconds": 10 * i * clock_per_step + (5.0 if i else 0.0), "target_sampled": v}
            for i, v in enumerate(values)]


def test_ratio_is_the_reference_time_over_the_method_time_at_the_first_crossing():
    full = _records([0.1, 0.12, 0.15, 0.2, 0.2], clock_per_step=1.0)  # reaches 0.2 at step 30, clock 35
    method = _records([0.1, 0.2, 0.1, 0.1, 0.1], clock_per_step=2.0)  # reaches 0.2 at step 10, clock 25
    assert bench.final_accuracy(full) == pytest.approx(0.2)
    steps = bench.ratio(full, method, 0.2, "step")
    assert (steps["status"], steps["value"]) == ("ok", pytest.approx(3.0))
    clock = bench.ratio(full, method, 0.2, "clock_seconds")
    assert clock["value"] == pytest.approx(35.0 / 25.0)
    assert bench.ratio(full, _records([0.1, 0.1, 0.1]), 0.2, "step")["status"] == "not_reached"
    assert bench.ratio(full, _records([0.3, 0.1]), 0.2, "step")["status"] == "at_start"


def test_interval_is_the_student_t_interval():
    out = bench.interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / 3 ** 0.5  # t(0.975, 2) · sd / √n, sd = 1
    assert out["mean"] == 2.0 and out["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert bench.interval([5.0]) == {"mean": 5.0, "ci95": None, "sd": None, "n": 1}


def test_a_warmup_below_its_threshold_is_retried_with_another_batch_seed(tmp_path, monkeypatch):
    """The fault injected: the first warm-up ends below ``stop_at_greedy`` (as `sub3`'s did at 3,000 steps)."""
    calls = []

    def run_cli(cfg, out, log):  # stands in for `cropi run`: records the warm-up's outcome in state.json
        calls.append(cfg["run"]["seed"])
        reached = len(calls) > 1
        out.mkdir(parents=True, exist_ok=True)
        (out / "state.json").write_text(json.dumps({"info": {"warmup": {
            "steps": 2800 if reached else 3000, "greedy_val": 0.25 if reached else 0.05,
            "reached_threshold": reached, "seconds": 10.0}}}))
        return {"ok": True, "rc": 0, "wall_seconds": 0.1, "log": str(log)}

    monkeypatch.setattr(bench, "run_cli", run_cli)
    cfg0 = {"run": {"seed": 1234}, "selection": {}, "curriculum": {"warmup": {"max_steps": 3000}}}
    beta, warmups = bench.behaviour_policy(cfg0, tmp_path, attempts=3)
    assert calls == [1234, 1235]
    assert beta == tmp_path / "warmup-a1" / "warmup" / "hf"
    assert [w["reached_threshold"] for w in warmups] == [False, True]
    assert [w["run_seed"] for w in warmups] == [1234, 1235]
    assert [w["max_steps"] for w in warmups] == [3000, 6000]  # a retry may run twice as long
    assert [w["chosen"] for w in warmups] == [False, True]
    # one attempt only: the weak β is used, and the result says so
    calls.clear()
    beta, warmups = bench.behaviour_policy(cfg0, tmp_path / "once", attempts=1)
    assert calls == [1234] and warmups[-1]["reached_threshold"] is False and warmups[-1]["chosen"]


def test_when_no_warmup_reaches_the_threshold_the_best_one_is_used(tmp_path, monkeypatch):
    greedy = [0.09, 0.0, 0.05]  # add4's first two attempts measured 0.09 and 0.0 after 3,000 steps

    def run_cli(cfg, out, log):
        out.mkdir(parents=True, exist_ok=True)
        value = greedy[cfg["run"]["seed"] - 1234]
        (out / "state.json").write_text(json.dumps({"info": {"warmup": {
            "steps": 3000, "greedy_val": value, "reached_threshold": False, "seconds": 10.0}}}))
        return {"ok": True, "rc": 0, "wall_seconds": 0.1, "log": str(log)}

    monkeypatch.setattr(bench, "run_cli", run_cli)
    cfg0 = {"run": {"seed": 1234}, "selection": {}, "curriculum": {"warmup": {"max_steps": 3000}}}
    beta, warmups = bench.behaviour_policy(cfg0, tmp_path, 3)
    assert beta == tmp_path / "warmup" / "warmup" / "hf"
    assert [w["chosen"] for w in warmups] == [True, False, False]


def test_every_method_starts_from_the_papers_setting_and_the_cpu_default_is_one_of_them():
    """The benchmark's base pins β's rollouts for every stage, 10% and plain GRPO, whatever the CPU default
    sets, so ``full`` stays plain full-data GRPO; the CPU default's selection is the method
    ``cropi_first1_r10_dynamic``."""
    import argparse

    import yaml

    args = argparse.Namespace(target="add3c", stages=6, steps_per_stage=50, eval_every=10, eval_max_prompts=0)
    base = bench.base_config(args)
    assert base["selection"]["ratio"] == 0.1 and base["curriculum"]["refresh_behaviour_every"] == 0
    assert base["curriculum"]["selected_stages"] == 0 and base["curriculum"]["background_scoring"] is False
    assert base["grpo"]["dynamic_sampling"] == {"enabled": False}
    default = yaml.safe_load((ROOT / "examples/configs/tiny_cpu.yaml").read_text())
    method = json.loads(json.dumps(base))
    assert bench.CPU_DEFAULT_METHOD == "cropi_first1_r10_dynamic_bg" and bench.CPU_DEFAULT_METHOD in bench.DEFAULT_METHODS
    assert {"full", "random", "learnability", "online_learnability", "dynamic_sampling"} <= set(bench.DEFAULT_METHODS)
    for key, value in bench.METHODS[bench.CPU_DEFAULT_METHOD].items():
        bench.set_key(method, key, value)
    for section, key in (("selection", "policy"), ("selection", "ratio"), ("curriculum", "refresh_behaviour_every"),
                         ("curriculum", "selected_stages"), ("curriculum", "background_scoring"),
                         ("grpo", "dynamic_sampling")):
        assert method[section][key] == default[section][key], (section, key)


def test_every_method_is_a_valid_run_config(tmp_path):
    """Each method's overrides, on the benchmark's base, load as a run config (a misspelt key or a bad
    value would otherwise fail only minutes into a benchmark run)."""
    import argparse

    import yaml

    from megatron_cropi.run_config import load_run_config

    args = argparse.Namespace(target="sub3", stages=6, steps_per_stage=50, eval_every=10, eval_max_prompts=0)
    for name, overrides in bench.METHODS.items():
        cfg = json.loads(json.dumps(bench.base_config(args)))
        cfg["run"]["output_dir"] = str(tmp_path / name)
        for key, value in overrides.items():
            bench.set_key(cfg, key, value)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        loaded = load_run_config(path)
        assert loaded.selection.policy == overrides["selection.policy"], name
        if "curriculum.selected_stages" in overrides:
            assert loaded.curriculum.selecting_stages == overrides["curriculum.selected_stages"], name
