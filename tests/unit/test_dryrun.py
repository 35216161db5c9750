"""``cropi run --dry-run`` checks beyond the config itself: layout, vLLM, batch split, paths, memory."""

import json
from pathlib import Path

import pytest

from megatron_cropi.config.loader import from_dict
from megatron_cropi.run_config import RunConfig
from megatron_cropi.dryrun import DryRunError, dry_run


def _cfg(tmp_path, **sections):
    d = {"run": {"output_dir": str(tmp_path / "run")}, "model": {"preset": "tiny"}}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return from_dict(RunConfig, d)


def _problems(cfg, **kw) -> str:
    with pytest.raises(DryRunError) as info:
        dry_run(cfg, **kw)
    return str(info.value)


def test_vllm_tensor_parallelism_must_fit_a_node_and_a_replica(tmp_path):
    hf = _hf_dir(tmp_path)
    rollout = {"engine": "vllm", "checkpoint": str(hf), "vllm": {"tensor_parallel_size": 4}}
    msg = _problems(_cfg(tmp_path, rollout=rollout, parallel={"tensor_model_parallel_size": 2}),
                    world_size=4, gpus_per_node=2)
    assert "rollout.vllm.tensor_parallel_size=4 exceeds the 2 GPUs of a node" in msg
    assert "must divide the 2 GPUs (TP×PP)" in msg
    ok = dict(rollout, vllm={"tensor_parallel_size": 2})
    summary = dry_run(_cfg(tmp_path, rollout=ok, parallel={"tensor_model_parallel_size": 2},
                           grpo={"prompts_per_step": 8, "micro_batch_prompts": 4}), world_size=4, gpus_per_node=2)
    assert summary["nodes"] == 2 and summary["rollout"]["engines"] == 2


def test_prompts_per_step_and_micro_batches_must_split_over_data_parallel_ranks(tmp_path):
    msg = _problems(_cfg(tmp_path, grpo={"prompts_per_step": 6, "micro_batch_prompts": 1}), world_size=4)
    assert "grpo.prompts_per_step=6 is not divisible by the data-parallel size 4" in msg
    msg = _problems(_cfg(tmp_path, grpo={"prompts_per_step": 16, "micro_batch_prompts": 3}), world_size=4)
    assert "grpo.micro_batch_prompts=3 does not divide the 4 prompts" in msg
    assert dry_run(_cfg(tmp_path, grpo={"prompts_per_step": 16, "micro_batch_prompts": 2}), world_size=4)["layout"]["dp"] == 4


def test_scoring_mode_must_suit_the_layer_spec(tmp_path):
    msg = _problems(_cfg(tmp_path, model={"layer_spec": "te"}, grpo={"prompts_per_step": 8}))
    assert "scoring.mode batched sees megatron-core's local-spec modules only" in msg
    ok = dry_run(_cfg(tmp_path, scoring={"mode": "per_prompt"}, model={"layer_spec": "te"}, grpo={"prompts_per_step": 8}))
    assert ok["layout"]["tp"] >= 1  # per-prompt capture works with any spec, inside DDP too
    warned = dry_run(_cfg(tmp_path, grpo={"prompts_per_step": 8}))["warnings"]
    assert any("layer_spec auto resolves to te" in w for w in warned)
    assert not dry_run(_cfg(tmp_path, model={"layer_spec": "local"}, grpo={"prompts_per_step": 8}))["warnings"]


def test_sequence_parallel_with_batched_scoring_passes_on_the_local_spec(tmp_path):
    """SP + batched capture on the local spec is a layout the dry run accepts (capture and GRPO are
    checked against TP = 1, tests/distributed/test_popi_capture_sp.py and test_grpo_sp.py), estimated
    with SP (layer inputs split TP ways: tests/unit/test_memory.py; capture's gathers:
    test_memory_capture.py); what SP does not support is refused at load (test_model_warnings.py)."""
    hf = _hf_dir(tmp_path)
    sections = dict(rollout={"engine": "vllm", "checkpoint": str(hf), "vllm": {"tensor_parallel_size": 2}},
                    parallel={"tensor_model_parallel_size": 2}, grpo={"prompts_per_step": 8},
                    scoring={"mode": "batched"})
    plain = dry_run(_cfg(tmp_path, model={"layer_spec": "local"}, **sections), world_size=2)
    sp = dry_run(_cfg(tmp_path, model={"layer_spec": "local", "transformer": {"sequence_parallel": True}},
                      **sections), world_size=2)
    assert sp["memory"]["assumptions"]["sequence_parallel"] and not plain["memory"]["assumptions"]["sequence_parallel"]
    with pytest.raises(Exception, match="sequence_parallel with model.layer_spec 'te'"):
        _cfg(tmp_path, model={"layer_spec": "te", "transformer": {"sequence_parallel": True}}, **sections)


def test_data_files_fields_rows_and_tokenizer(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "#### 1"}] * 7), tmp_path / "gsm8k.parquet")
    (tmp_path / "math.jsonl").write_text("".join(json.dumps({"problem": "p", "solution": "\\boxed{1}"}) + "\n"
                                                 for _ in range(9)))
    (tmp_path / "tok").mkdir()
    data = {"kind": "files", "tokenizer": str(tmp_path / "tok"),
            "pool": [{"path": str(tmp_path / "gsm8k.parquet"), "format": "gsm8k"},
                     {"path": str(tmp_path / "math.jsonl"), "format": "math", "limit": 4}],
            "val": [{"path": str(tmp_path / "math.jsonl"), "format": "deepscaler", "source": "math"},
                    {"path": str(tmp_path / "absent.parquet")}]}
    msg = _problems(_cfg(tmp_path, data=data, grpo={"prompts_per_step": 8}))
    assert "data.val[0]: " in msg and "has no field 'answer'" in msg and "set data.val[0].answer_field" in msg
    assert "data.val[1].path" in msg and "does not exist" in msg
    assert "data.tokenizer" in msg and "holds no tokenizer file" in msg
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    data["val"] = [{"path": str(tmp_path / "math.jsonl"), "format": "math", "source": "math"}]
    summary = dry_run(_cfg(tmp_path, data=data, grpo={"prompts_per_step": 8}, projection={"k": 16}))
    assert summary["data_rows"]["pool"] == {"gsm8k": 7, "math": 4} and summary["data_rows"]["val"] == {"math": 9}
    stores = summary["feature_stores_on_disk"]
    assert stores["rows"] == {"pool": 11, "target-math": 9}
    assert stores["all_stages_gib"] == round(6 * (11 + 9) * (16 * 4 + 1) / 1024 ** 3, 3)


def _hf_dir(tmp_path, **change):
    import torch

    from megatron_cropi.checkpoint.hf_config import GPTDimensions, hf_config_from_dimensions

    model = _cfg(tmp_path).model
    config = hf_config_from_dimensions(GPTDimensions.from_model_config(model), dtype=torch.float32,
                                       max_position_embeddings=64)
    out = tmp_path / "hf"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config, **change}))
    return out


def test_rollout_checkpoint_config_must_match_the_model(tmp_path):
    rollout = {"engine": "vllm", "checkpoint": str(_hf_dir(tmp_path))}
    summary = dry_run(_cfg(tmp_path, rollout=rollout, grpo={"prompts_per_step": 8}))
    assert any("no *.safetensors" in w for w in summary["warnings"])
    _hf_dir(tmp_path, num_hidden_layers=3)
    assert "num_layers: 2 vs 3" in _problems(_cfg(tmp_path, rollout=rollout, grpo={"prompts_per_step": 8}))
    _hf_dir(tmp_path, architectures=["MistralForCausalLM"])
    assert "'MistralForCausalLM' is not supported" in _problems(_cfg(tmp_path, rollout=rollout,
                                                                      grpo={"prompts_per_step": 8}))
    rollout["checkpoint"] = str(tmp_path / "missing")
    assert "rollout.checkpoint: HF checkpoint directory" in _problems(_cfg(tmp_path, rollout=rollout,
                                                                            grpo={"prompts_per_step": 8}))


def test_memory_budget(tmp_path):
    cfg = _cfg(tmp_path, grpo={"prompts_per_step": 8})
    summary = dry_run(cfg)
    assert summary["memory"]["label"].startswith("computed")
    assert 2.0 < summary["memory"]["peak_gib"] < 2.1          # the 2 GiB overhead + a tiny model
    msg = _problems(cfg, gpu_memory_gib=1.5)
    assert "memory: the estimate for pipeline stage 0" in msg and "over the 1.5 GiB budget" in msg


def test_vllm_engine_must_fit_its_share_with_a_kv_cache_minimum(tmp_path):
    """Weights over the engine's own TP + workspace + CUDA graphs + KV for batch_prompts × n full-length
    sequences must fit ``gpu_memory_utilization × GPU memory``; the message names every key."""
    hf = _hf_dir(tmp_path)
    rollout = {"engine": "vllm", "checkpoint": str(hf), "n": 4, "batch_prompts": 8, "max_tokens": 6,
               "vllm": {"gpu_memory_utilization": 0.1, "dtype": "bfloat16", "enforce_eager": False}}
    grpo = {"prompts_per_step": 8}
    # 0.1 × 20 GiB = 2 GiB: the 1.5 GiB workspace and the 1 GiB of CUDA graphs leave no KV cache
    msg = _problems(_cfg(tmp_path, rollout=rollout, grpo=grpo), gpu_memory_gib=20.0)
    assert "vLLM memory: rollout.vllm.gpu_memory_utilization=0.1 gives the engine 2.0 GiB per GPU" in msg
    assert "rollout.vllm.tensor_parallel_size=1" in msg and "rollout.vllm.enforce_eager=false" in msg
    assert "rollout.batch_prompts 8 × rollout.n 4 = 32 sequences" in msg and "rollout.batch_prompts=8" in msg
    # without CUDA graphs the same share fits, and the summary carries the engine's figures
    eager = dict(rollout, vllm={**rollout["vllm"], "enforce_eager": True})
    summary = dry_run(_cfg(tmp_path, rollout=eager, grpo=grpo), gpu_memory_gib=20.0)
    engine = summary["rollout"]["vllm_memory"]
    assert engine["fits"] and engine["share_gib"] == 2.0 and engine["kv_cache_gib"] > engine["min_kv_cache_gib"]


def test_vllm_tensor_parallelism_must_split_the_attention_heads(tmp_path):
    rollout = {"engine": "vllm", "checkpoint": str(_hf_dir(tmp_path)), "vllm": {"tensor_parallel_size": 8}}
    msg = _problems(_cfg(tmp_path, rollout=rollout, grpo={"prompts_per_step": 8}), world_size=8, gpus_per_node=8)
    assert "rollout.vllm.tensor_parallel_size=8 must divide the model's 4 attention heads" in msg


def test_dry_run_estimates_time_and_disk_and_states_its_assumptions(tmp_path):
    from megatron_cropi.dryrun import run_estimate
    from megatron_cropi.run_config import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[2] / "examples" / "configs" / "qwen2.5-7b-instruct_2node.yaml",
                          environ={"DATA_DIR": "/data", "MODEL_DIR": "/model"})
    rows = {"pool": {"gsm8k": 7_473, "math": 7_500, "deepscaler": 40_315}, "val": {"math500": 1_000}}
    est = run_estimate(cfg, world_size=16, nodes=2, rows=rows)
    t, d = est["time_seconds"], est["disk_bytes"]
    # docs/at_scale.md §3's 7B 2-node row: behaviour 3.8 h, 100 steps 5.3 h per stage; scoring 8.1 h without
    # options (~84 h in all), 3.2 h with the length-aware micro-batches the example now sets (Table 2, b0)
    assert t["behaviour_rollouts_s"] / 3600 == pytest.approx(3.8, abs=0.05)
    assert t["stage_s"] == pytest.approx(t["scoring_per_stage_s"] + 100 * t["grpo_step_s"])
    assert t["total_s"] == pytest.approx(6 * t["stage_s"] + t["behaviour_rollouts_s"])
    assert t["scoring_per_stage_s"] / 3600 == pytest.approx(3.2, abs=0.1)
    assert 50 < t["total_s"] / 3600 < 60
    params = cfg.model.num_parameters()
    assert d["checkpoints"] == params * (2 + 12) * cfg.grpo.checkpoint.keep_last  # bf16 weights + optimizer
    assert d["hf_exports"] == params * 2  # final_hf only: no warm-up with real models
    k, kept = cfg.projection.k, cfg.curriculum.stages if cfg.curriculum.keep_features == "all" else 1
    assert d["feature_stores"] == pytest.approx(56_288 * k * 2 * kept, rel=0.01)  # (pool + targets) × k × 2 B
    assert d["total"] == sum(v for key, v in d.items() if key != "total")
    text = "\n".join(est["text"])
    assert "time: ~5" in text and "6 stages" in text and "55288 pool and 1000 target prompts" in text
    assert "MFU 0.35" in text and "trajectory stores: prompts × K × mean response tokens" in text

    summary = dry_run(_cfg(tmp_path, grpo={"prompts_per_step": 8}))  # synthetic data: the suite's sizes
    assert summary["estimate"]["time_seconds"]["total_s"] > 0 and "data.synthetic sizes" in summary["estimate"]["text"][0]
    json.dumps(summary)  # printable as the dry run's JSON


def test_a_selection_visited_too_often_per_stage_is_warned_about_by_name(tmp_path):
    """visits = steps_per_stage × prompts_per_step / int(ratio × pool); the synthetic default pool is
    160 prompts × 13 families = 2080, so ratio 0.1 → 208 prompts, 50 × 32 / 208 = 7.7 visits."""
    cfg = _cfg(tmp_path, model={"layer_spec": "local"}, grpo={"prompts_per_step": 32, "micro_batch_prompts": 32},
               curriculum={"steps_per_stage": 50}, selection={"ratio": 0.1})
    summary = dry_run(cfg)
    assert summary["stage_visits"] == {"selected_prompts": 208, "visits_per_prompt": 7.69,
                                       "ratio_for_max_visits": round(50 * 32 / (3 * 2080), 3)}
    assert any(w.startswith("selection.ratio=0.1 selects 208 prompts") and "7.7 times each" in w
               and "Raise selection.ratio to about 0.256" in w for w in summary["warnings"])
    ok = dry_run(_cfg(tmp_path, model={"layer_spec": "local"}, grpo={"prompts_per_step": 32, "micro_batch_prompts": 32},
                      curriculum={"steps_per_stage": 50}, selection={"ratio": 0.3}))
    assert ok["stage_visits"]["visits_per_prompt"] == round(1600 / 624, 2) and not ok["warnings"]
    full = dry_run(_cfg(tmp_path, model={"layer_spec": "local"}, selection={"policy": "full"}))
    assert full["stage_visits"] is None
    warm = dry_run(_cfg(tmp_path, model={"layer_spec": "local"}, grpo={"prompts_per_step": 32, "micro_batch_prompts": 32},
                        curriculum={"steps_per_stage": 50, "selected_stages": 1}, selection={"ratio": 0.1}))
    assert warm["stage_visits"]["visits_per_prompt"] == 7.69 and not warm["warnings"], "a warm start repeats by design"
    every = dry_run(_cfg(tmp_path, model={"layer_spec": "local"}, grpo={"prompts_per_step": 32, "micro_batch_prompts": 32},
                         curriculum={"steps_per_stage": 50, "selected_stages": 2, "stages": 2}, selection={"ratio": 0.1}))
    assert any("7.7 times each" in w for w in every["warnings"]), "selected_stages = stages selects at every stage"
    # ratio 0.3 (2.6 visits a stage) held for 2 stages (curriculum.select_every) visits each prompt 5.1 times
    held = dry_run(_cfg(tmp_path, model={"layer_spec": "local"}, grpo={"prompts_per_step": 32, "micro_batch_prompts": 32},
                        curriculum={"steps_per_stage": 50, "select_every": 2}, selection={"ratio": 0.3}))
    assert any("2.6 times each, held for curriculum.select_every=2 stages, 5.1 times in all" in w
               and "Raise selection.ratio to about 0.512" in w for w in held["warnings"]), held["warnings"]
    never = dry_run(_cfg(tmp_path, model={"layer_spec": "local"},
                         curriculum={"selected_stages": 1, "refresh_behaviour_every": 1}))
    assert any(w.startswith("curriculum.refresh_behaviour_every=1 never re-rolls") for w in never["warnings"])


def test_run_estimate_charges_scoring_and_refreshes_to_the_selecting_stages_only():
    import dataclasses

    from megatron_cropi.dryrun import run_estimate
    from megatron_cropi.run_config import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[2] / "examples" / "configs" / "qwen2.5-7b-instruct_2node.yaml",
                          environ={"DATA_DIR": "/data", "MODEL_DIR": "/model"})
    rows = {"pool": {"gsm8k": 7_473, "math": 7_500, "deepscaler": 40_315}, "val": {"math500": 1_000}}
    every = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, refresh_behaviour_every=1))
    first2 = dataclasses.replace(every, curriculum=dataclasses.replace(every.curriculum, selected_stages=2))
    a = run_estimate(every, world_size=16, nodes=2, rows=rows)
    b = run_estimate(first2, world_size=16, nodes=2, rows=rows)
    ta, tb = a["time_seconds"], b["time_seconds"]
    assert (ta["selecting_stages"], ta["behaviour_refreshes"]) == (6, 5)
    assert (tb["selecting_stages"], tb["behaviour_refreshes"]) == (2, 1)
    behaviour_once = ta["behaviour_rollouts_s"] / 6
    assert tb["total_s"] == pytest.approx(6 * 100 * tb["grpo_step_s"] + 2 * tb["scoring_per_stage_s"] + 2 * behaviour_once)
    assert "scoring" in b["text"][0] and "for the first 2 (curriculum.selected_stages" in b["text"][0]
    # with a shortlist, stage 0 scores the whole live pool and later stages part of it: the selecting stages
    # (the first ones) are charged what they score, not the run's mean per stage
    def with_shortlist(n):
        curriculum = dataclasses.replace(every.curriculum, selected_stages=n)
        scoring = dataclasses.replace(every.scoring, shortlist=dataclasses.replace(every.scoring.shortlist, fraction=0.5))
        return run_estimate(dataclasses.replace(every, curriculum=curriculum, scoring=scoring), world_size=16, nodes=2,
                            rows=rows)["time_seconds"]
    one, two = with_shortlist(1), with_shortlist(2)
    assert one["scoring_all_stages_s"] > one["scoring_per_stage_s"], "stage 0 scores more than the mean stage"
    assert one["scoring_all_stages_s"] < two["scoring_all_stages_s"] < 2 * one["scoring_all_stages_s"]
    kept = b["disk_bytes"]["feature_stores"] / a["disk_bytes"]["feature_stores"]
    assert kept == pytest.approx(2 / 6) and b["disk_bytes"]["trajectory_stores"] < a["disk_bytes"]["trajectory_stores"]
    assert "selected_stages" not in a["text"][0]
    # curriculum.select_every: 2 over the same two selecting stages: stage 1 holds stage 0's selection, so one
    # scoring, one behaviour roll-out (no refresh) and one stage of feature stores
    held = dataclasses.replace(first2, curriculum=dataclasses.replace(first2.curriculum, select_every=2,
                                                                      refresh_behaviour_every=2))
    c = run_estimate(held, world_size=16, nodes=2, rows=rows)
    tc = c["time_seconds"]
    assert (tc["selecting_stages"], tc["scoring_stages"], tc["behaviour_refreshes"]) == (2, 1, 0)
    assert tc["total_s"] == pytest.approx(6 * 100 * tc["grpo_step_s"] + tc["scoring_per_stage_s"] + behaviour_once)
    assert c["disk_bytes"]["feature_stores"] / a["disk_bytes"]["feature_stores"] == pytest.approx(1 / 6)
    assert "(curriculum.selected_stages; 1 of them hold an earlier selection (curriculum.select_every);" in c["text"][0]
    # every stage selects, every other one anew: 3 scorings of 6, in the total and in words
    alternate = dataclasses.replace(every, curriculum=dataclasses.replace(every.curriculum, select_every=2,
                                                                          refresh_behaviour_every=2))
    d = run_estimate(alternate, world_size=16, nodes=2, rows=rows)
    td = d["time_seconds"]
    assert (td["selecting_stages"], td["scoring_stages"], td["behaviour_refreshes"]) == (6, 3, 2)
    assert td["total_s"] == pytest.approx(6 * 100 * td["grpo_step_s"] + 3 * td["scoring_per_stage_s"]
                                          + 3 * behaviour_once)
    assert "scoring" in d["text"][0] and "at 3 of them (3 of them hold an earlier selection" in d["text"][0]
    background = dataclasses.replace(alternate, curriculum=dataclasses.replace(alternate.curriculum,
                                                                               background_scoring=True,
                                                                               background_scorer="external"))
    text = run_estimate(background, world_size=16, nodes=2, rows=rows)["text"][0]
    assert "per selecting stage that selects anew off the critical path" in text and "3 of them hold" in text


def test_run_estimate_with_background_scoring_charges_only_the_wait_for_the_scoring_job():
    import dataclasses

    from megatron_cropi.dryrun import run_estimate
    from megatron_cropi.run_config import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[2] / "examples" / "configs" / "qwen2.5-7b-instruct_2node.yaml",
                          environ={"DATA_DIR": "/data", "MODEL_DIR": "/model"},
                          overrides=["curriculum.background_scoring=true", "curriculum.background_scorer=external"])
    rows = {"pool": {"gsm8k": 7_473, "math": 7_500, "deepscaler": 40_315}, "val": {"math500": 1_000}}
    est = run_estimate(cfg, world_size=16, nodes=2, rows=rows)
    t = est["time_seconds"]
    steps = t["grpo_steps_per_stage_s"]
    assert t["background_scoring"] and t["scoring_per_stage_s"] < steps  # shorter than the stage: no wait
    assert t["stage_s"] == pytest.approx(steps) and t["scoring_waits_s"] == 0
    assert t["switch_fraction"] == pytest.approx(t["scoring_per_stage_s"] / steps)
    assert t["total_s"] == pytest.approx(6 * steps + t["behaviour_rollouts_s"])
    assert "off the critical path" in est["text"][0] and "0.0 min of waiting" in est["text"][0], est["text"][0]
    # stages of 10 steps: the scoring job is slower than the stage, which waits for it at its end
    short = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, steps_per_stage=10))
    s = run_estimate(short, world_size=16, nodes=2, rows=rows)["time_seconds"]
    steps = s["grpo_steps_per_stage_s"]
    assert s["scoring_per_stage_s"] > steps and s["switch_fraction"] == 1.0
    assert s["stage_s"] == pytest.approx(s["scoring_per_stage_s"])
    assert s["scoring_waits_s"] == pytest.approx(6 * (s["scoring_per_stage_s"] - steps))
    assert s["total_s"] == pytest.approx(6 * steps + s["scoring_waits_s"] + s["behaviour_rollouts_s"])


def test_run_estimate_with_background_rollouts_moves_beta_into_the_scoring_job():
    import dataclasses

    from megatron_cropi.dryrun import run_estimate
    from megatron_cropi.run_config import load_run_config

    over = ["curriculum.background_scoring=true", "curriculum.background_scorer=external"]
    rows = {"pool": {"gsm8k": 7_473, "math": 7_500, "deepscaler": 40_315}, "val": {"math500": 1_000}}
    path = Path(__file__).resolve().parents[2] / "examples" / "configs" / "qwen2.5-7b-instruct_2node.yaml"
    env = {"DATA_DIR": "/data", "MODEL_DIR": "/model"}
    for steps_per_stage in (None, 10):
        times = []
        for extra in ([], ["curriculum.background_rollouts=true"]):
            cfg = load_run_config(path, environ=env, overrides=over + extra)
            if steps_per_stage:
                cfg = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum,
                                                                              steps_per_stage=steps_per_stage))
            times.append(run_estimate(cfg, world_size=16, nodes=2, rows=rows)["time_seconds"])
        fg, bg = times
        steps, beta = bg["grpo_steps_per_stage_s"], bg["behaviour_rollouts_s"]
        assert bg["background_rollouts"] and not fg["background_rollouts"] and beta > 0
        # β's rollouts leave the run's clock; the run waits only where the job outlasts stage 0's steps
        assert bg["total_s"] == pytest.approx(6 * steps + bg["scoring_waits_s"])
        assert fg["scoring_waits_s"] <= bg["scoring_waits_s"] <= fg["scoring_waits_s"] + beta + 1e-6
        assert bg["total_s"] <= fg["total_s"] + 1e-6
        if steps_per_stage:  # the job was already the longer: all of β's rollouts are waited for
            assert bg["scoring_waits_s"] == pytest.approx(fg["scoring_waits_s"] + beta)
    text = run_estimate(cfg, world_size=16, nodes=2, rows=rows)["text"][0]
    assert "in the scoring job, curriculum.background_rollouts" in text and "+ behaviour rollouts" not in text, text
