"""GPU tier: a one-stage ``cropi run`` on CUDA with a tiny model, end to end.

Warm-up → behaviour rollouts → scoring → selection → GRPO → report → HF export, on one GPU (NCCL,
world size 1), first with the native sampler, then with the CUDA vLLM engine colocated in the same
process (weights pushed after every update). Both configs pass the dry run first. The model uses the
local layer spec: ``auto`` would pick Transformer Engine on a GPU image, which batched scoring cannot
hook (the dry run warns about exactly that).

The run must *select by influence*: ``selection.fallback: error`` makes a stage whose pool or target set
has no gradient fail instead of quietly using the learnability baseline, and the selection written must
be CROPI's, with finite cosines and target prompts behind its direction. 8 behaviour responses per
prompt (not the CPU tests' 4) make groups with mixed rewards likely after the short warm-up.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from megatron_cropi.testing.spawn import run_ranks

pytestmark = pytest.mark.gpu

VLLM = {"model": {"preset": "tiny-vllm", "layer_spec": "local"},
        "rollout": {"engine": "vllm", "vllm": {"dtype": "float32", "gpu_memory_utilization": 0.3, "max_model_len": 64}},
        "grpo": {"old_logprobs": "recompute"}}


def _config(out: Path, extra: dict | None = None) -> dict:
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    cfg = tiny_curriculum_config(str(out), **{"model.layer_spec": "local", "grpo.loss.kl_coef": 0.001,
                                              "curriculum.stages": 1, "curriculum.pool_samples": 8,
                                              "curriculum.target_samples": 8, "selection.fallback": "error"})
    for section, values in (extra or {}).items():
        for key, value in values.items():
            cfg[section][key] = {**cfg[section].get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _run_worker(cfg_dict):
    import torch

    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.run_config import RunConfig
    from megatron_cropi.curriculum.controller import run_curriculum

    summary = run_curriculum(from_dict(RunConfig, cfg_dict))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return json.loads(json.dumps(summary, default=str)), peak


def _check_run(out: Path, cfg_dict: dict):
    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.run_config import RunConfig
    from megatron_cropi.dryrun import dry_run

    dry = dry_run(from_dict(RunConfig, cfg_dict), world_size=1, gpus_per_node=1)
    assert dry["layout"] == {"tp": 1, "pp": 1, "dp": 1} and not any("auto" in w for w in dry["warnings"])
    summary, peak = run_ranks(_run_worker, 1, args=(cfg_dict,), timeout_s=900)[0]
    assert peak > 0, "nothing was allocated on the GPU"
    state = json.loads((out / "state.json").read_text())
    done = set(state["done"])
    assert {"stage0/score/pool", "stage0/train", "stage0/report", "final_hf"} <= done, sorted(done)
    selection = json.loads((out / "selections" / "stage0.json").read_text())
    # CROPI's own selection, not the learnability fallback: at most 25% of the 48 pool prompts (fewer
    # when fewer have a gradient), scored by finite cosines against a direction with target prompts
    assert selection["policy"] == "cropi", selection["summary"]
    assert "fallback" not in selection["summary"], selection["summary"]
    assert 1 <= len(selection["prompt_ids"]) <= 12
    assert all(math.isfinite(x) for x in selection["scores"])
    assert sum(t["target_prompts_used"] for t in selection["summary"]["targets"].values()) > 0
    quantiles = selection["summary"]["cosine_quantiles"]
    assert -1.0 <= min(quantiles.values()) <= max(quantiles.values()) <= 1.0, quantiles
    assert selection["summary"]["zero_gradient_prompts"] < 48, selection["summary"]
    assert (out / "final_hf" / "config.json").is_file()
    assert summary.get("final"), summary
    return summary


def test_one_stage_cropi_run_on_cuda_with_the_native_sampler(tmp_path):
    _check_run(tmp_path / "run", _config(tmp_path / "run"))


def test_one_stage_cropi_run_on_cuda_with_colocated_vllm(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs the CUDA vllm build")
    from megatron_cropi.testing.hf_tiny import save_tiny_hf_model

    # rollout.checkpoint is required with engine vllm and must describe the model (the dry run checks
    # it); the warm-up's export replaces it as β
    hf = save_tiny_hf_model(tmp_path / "init", "qwen2", tied=True, vocab_size=256, hidden_size=256, num_layers=2,
                            num_heads=4, num_kv_heads=2, intermediate_size=512, rope_theta=10000.0,
                            max_position_embeddings=256)
    cfg = _config(tmp_path / "run", VLLM)
    cfg["rollout"]["checkpoint"] = str(hf)
    _check_run(tmp_path / "run", cfg)
