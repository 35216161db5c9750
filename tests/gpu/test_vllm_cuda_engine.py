"""GPU tier: the same VLLMEngine with the CUDA ``vllm`` build, and the native sampler on CUDA.

vLLM on CUDA: n > 1 samples whose log-probs equal HF transformers' (fp32) under the sampling
distribution, a weight push into the running engine, and the isolated (own process) mode. The native
sampler runs a tiny Megatron model on CUDA.
"""

import importlib.util

import numpy as np
import pytest
import torch

from megatron_cropi.records import PromptRecord, SamplingParams

pytestmark = pytest.mark.gpu

SAMPLING = SamplingParams(n=4, temperature=0.8, top_p=0.95, max_tokens=12, seed=3)
STOP = tuple(range(5, 256, 16))


def _prompts():
    return [PromptRecord(prompt_id=f"g{i}", token_ids=np.array([(11 * i + 5 * j) % 250 + 1 for j in range(6 + i)],
                                                               dtype=np.int32), answer="") for i in range(6)]


def _cuda_session(model_dir):
    from transformers import AutoModelForCausalLM

    from megatron_cropi.rollout.sampling import token_logprobs
    from megatron_cropi.rollout.vllm_engine import VLLMEngine

    torch.backends.cuda.matmul.allow_tf32 = False
    engine = VLLMEngine(model_dir, stop_token_ids=STOP, max_model_len=64, dtype="float32", gpu_memory_utilization=0.3)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()

    def err(outputs):
        worst = 0.0
        for p, group in zip(_prompts(), outputs):
            for r in group:
                ids = torch.tensor([list(p.token_ids) + r.token_ids.tolist()], device="cuda")
                with torch.no_grad():
                    logits = hf(ids).logits[0].float()
                s = len(p.token_ids)
                ref = token_logprobs(logits[s - 1: s - 1 + len(r.token_ids)], torch.tensor(r.token_ids, device="cuda"),
                                     temperature=SAMPLING.temperature, top_p=SAMPLING.top_p)
                worst = max(worst, float((ref.cpu() - torch.from_numpy(r.logprobs)).abs().max()))
        return worst

    out = engine.generate(_prompts(), SAMPLING)
    res = {"tokens": [[r.token_ids.tolist() for r in g] for g in out], "err": err(out)}
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen, device="cuda"))
    engine.update_weights(hf.state_dict().items())
    after = engine.generate(_prompts(), SAMPLING)
    res["err_after"] = err(after)
    res["changed"] = [[r.token_ids.tolist() for r in g] for g in after] != res["tokens"]
    engine.close()
    return res


def test_vllm_cuda_engine_logprobs_weight_push_and_isolation(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs the CUDA vllm build")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_cropi.rollout.vllm_engine import VLLMEngine, run_isolated

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                      num_hidden_layers=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.save_pretrained(tmp_path / "m")
    res = run_isolated(_cuda_session, str(tmp_path / "m"), timeout_s=600)
    assert all(len(g) == SAMPLING.n for g in res["tokens"])
    assert res["err"] <= 2e-3 and res["err_after"] <= 2e-3 and res["changed"], res
    isolated = VLLMEngine(str(tmp_path / "m"), stop_token_ids=STOP, max_model_len=64, dtype="float32",
                          gpu_memory_utilization=0.3, isolate=True).generate(_prompts(), SAMPLING)
    assert [[r.token_ids.tolist() for r in g] for g in isolated] == res["tokens"]


def _native_worker():
    from megatron_cropi.data.synthetic import build_synthetic_sets
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.rollout.native_sampler import NativeSampler
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    groups = build_parallel_groups(1, 1)
    model = build_tiny_model(tiny_model_config("cpu-default"), groups, seed=4, std=0.5)
    prompts = build_synthetic_sets(seed=5, per_family=2, val_size=2, test_size=2, check_per_family=0).pool[:16]
    out = NativeSampler(model, groups, stop_token_ids=[1]).generate(prompts, SamplingParams(n=4, temperature=0.7))
    return str(groups.device), [[(r.token_ids.tolist(), r.logprobs.tolist()) for r in g] for g in out]


def test_native_sampler_on_cuda_runs_and_samples():
    from megatron_cropi.testing.spawn import run_ranks

    device, groups = run_ranks(_native_worker, 1, timeout_s=300)[0]
    assert device.startswith("cuda") and len(groups) == 16 and all(len(g) == 4 for g in groups)
    assert all(np.all(np.asarray(lp) <= 0) for g in groups for _, lp in g)
