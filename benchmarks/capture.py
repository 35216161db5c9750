"""Per-prompt gradient capture speed and memory: bare fwd+bwd vs capture modes vs the paper's method.

On a small Qwen2-style Megatron GPT (one process, TP=PP=1), a pool of N prompts × K = 8 responses,
seconds per prompt for

  (i)   bare forward+backward of the same micro-batches with no capture (the limit),
  (ii)  capture mode a (one backward per prompt, project each gradient shard, free it),
  (iii) capture mode b (many prompts per backward, frozen weights, per-layer per-prompt gradients),
  (iv)  the paper's method: per-prompt backward, flatten the whole gradient, keep a random subset,
        dense Gaussian projection generated block by block (TRAK BasicProjector style),

all at the same k, measured side by side in one run. Peak memory of scoring a pool of N and of 4N
prompts (mode b, features into a feature store) is measured in fresh subprocesses (peak RSS, and the
increment over the RSS after imports, model and pool are loaded).

    python benchmarks/capture.py --quick        # < 3 minutes on the 2-core CPU box

The last line printed is a JSON object with ``overhead_vs_bare`` ((iii)/(i)), ``speedup_vs_paper_method``
((iv)/(iii)) and ``peak_mem_growth_ratio`` (peak RSS at 4N over peak at N).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

K = 8
PROMPT_LEN, RESP_LEN = 16, 16


def bench_model_config():
    from megatron_cropi.testing.tiny import tiny_model_config

    return tiny_model_config(
        "custom", vocab_size=512, max_sequence_length=64, tie_word_embeddings=False, rotary_base=10000.0,
        transformer=dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                         num_query_groups=2))


def make_pool(n, vocab, seed=0):
    from megatron_cropi.rollout.types import PromptRecord, Response, RolloutGroup

    rng = np.random.default_rng(seed)
    pool = []
    for i in range(n):
        prompt = PromptRecord(f"b{i:06d}", rng.integers(1, vocab, PROMPT_LEN).astype(np.int32), answer="")
        resps = tuple(Response(rng.integers(1, vocab, RESP_LEN).astype(np.int32),
                               (-rng.uniform(2, 6, RESP_LEN)).astype(np.float32)) for _ in range(K))
        rewards = rng.integers(0, 2, K).astype(np.float32)
        rewards[0], rewards[1] = 1.0, 0.0  # every prompt has signal
        pool.append(RolloutGroup(prompt, resps, rewards))
    return pool


def setup(seed=0):
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model

    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    cfg = bench_model_config()
    return build_tiny_model(cfg, groups, seed=seed, std=0.02), groups, cfg


def time_bare(model, groups, mbs, repeats):
    """(i): the same micro-batches and loss through Megatron's schedule, ordinary weight gradients."""
    from megatron_cropi.model.logprobs import vocab_parallel_logprobs
    from megatron_cropi.model.schedule import causal_attention_mask, forward_backward, scale_for_schedule
    from megatron_cropi.popi.loss import popi_group_losses

    seq, nseq = mbs[0].tokens.shape[1], mbs[0].tokens.shape[0]
    mask = causal_attention_mask(seq, groups.device)

    def forward_step(it, m):
        mb = next(it)
        out = m(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=mask)

        def loss_func(logits):
            lp = vocab_parallel_logprobs(logits, mb.labels)
            loss = popi_group_losses(lp, mb.behaviour_logprobs, mb.mask, mb.rewards, mb.group_index,
                                     mb.num_groups).sum()
            return scale_for_schedule(loss, len(mbs)), {}

        return out, loss_func

    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        forward_backward(model, groups, forward_step_func=forward_step, data_iterator=iter(mbs),
                         num_microbatches=len(mbs), seq_length=seq, micro_batch_size=nseq)
        best = min(best, time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return best


def time_capture(model, groups, projector, pool, mode, ppm, repeats):
    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.popi.capture import PopiCapture

    mbs = pack_microbatches(pool, list(range(len(pool))), prompts_per_microbatch=ppm, responses_per_prompt=K,
                            seq_length=PROMPT_LEN + RESP_LEN)
    cap = PopiCapture(model, groups, projector, mode=mode)
    cap.run(mbs[:1], len(pool), K)  # warm the projector's index cache
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = cap.run(mbs, len(pool), K)
        best = min(best, time.perf_counter() - t)
    return best, out.sketches


def time_paper_method(model, groups, pool, k, keep_ratio, block=512, seed=0):
    """(iv): per-prompt backward, flatten, random subset, dense Gaussian projection (block matrix + matmul)."""
    from megatron_cropi.model.logprobs import vocab_parallel_logprobs
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.popi.loss import popi_group_losses

    params = [p for p in model.parameters()]
    d = sum(p.numel() for p in params)
    keep = torch.randperm(d, generator=torch.Generator().manual_seed(seed))[: max(1, int(d * keep_ratio))]
    mask = causal_attention_mask(PROMPT_LEN + RESP_LEN, groups.device)
    t = time.perf_counter()
    for group in pool:
        mb = pack_microbatches([group], [0], prompts_per_microbatch=1, responses_per_prompt=K,
                               seq_length=PROMPT_LEN + RESP_LEN)[0]
        model.zero_grad(set_to_none=True)
        lp = vocab_parallel_logprobs(model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=mask),
                                     mb.labels)
        popi_group_losses(lp, mb.behaviour_logprobs, mb.mask, mb.rewards, mb.group_index, 1).sum().backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])[keep]
        out = torch.empty(k)
        for j in range(0, k, block):  # the matrix block for output columns j..j+block, regenerated per prompt
            g = torch.Generator().manual_seed(seed * 100003 + j)
            out[j:j + block] = flat @ torch.randn(flat.numel(), min(block, k - j), generator=g)
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t) / len(pool), d


def peak_rss_child(n, kind, k, keep_ratio):
    """Score a pool of n prompts (mode b) into a feature store; print peak RSS in MiB."""
    from megatron_cropi.influence.feature_store import FeatureHeader, FeatureStore
    from megatron_cropi.influence.scorer import ScoringConfig, score_pool
    from megatron_cropi.projection.config import build_projector

    model, groups, cfg = setup()
    projector = build_projector(kind=kind, k=k, keep_ratio=keep_ratio, seed=0)
    pool = make_pool(n, cfg.vocab_size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after imports, model and pool
    with tempfile.TemporaryDirectory() as d:
        store = FeatureStore.open(os.path.join(d, "f"), FeatureHeader(num_rows=n, k=k, seed=0, projector=kind,
                                  param_set_hash="-", checkpoint_step=0, prompt_id_hash="-"))
        score_pool(pool, store, model=model, groups=groups, projector=projector,
                   cfg=ScoringConfig(prompts_per_microbatch=8, microbatches_per_call=2), temperature=1.0,
                   responses_per_prompt=K, progress=False)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_scoring_mib": base}))


def measure_peak(n, kind, k, keep_ratio):
    cmd = [sys.executable, __file__, "--peak-child", str(n), "--kind", kind, "--k", str(k),
           "--keep-ratio", str(keep_ratio)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="pool size (prompts)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--kind", default="sjlt", help="fast projector for modes a/b")
    ap.add_argument("--keep-ratio", type=float, default=0.1)
    ap.add_argument("--ppm", type=int, default=8, help="prompts per micro-batch in mode b and (i)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peak-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_child is not None:
        return peak_rss_child(args.peak_child, args.kind, args.k, args.keep_ratio)

    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.projection.config import build_projector

    n = args.n or (32 if args.quick else 128)
    repeats = 2 if args.quick else 3
    model, groups, cfg = setup()
    pool = make_pool(n, cfg.vocab_size)
    projector = build_projector(kind=args.kind, k=args.k, keep_ratio=args.keep_ratio, seed=0)
    mbs = pack_microbatches(pool, list(range(n)), prompts_per_microbatch=args.ppm, responses_per_prompt=K,
                            seq_length=PROMPT_LEN + RESP_LEN)
    t_bare = time_bare(model, groups, mbs, repeats) / n
    t_b, sk_b = time_capture(model, groups, projector, pool, "batched", args.ppm, repeats)
    t_a, sk_a = time_capture(model, groups, projector, pool, "per_prompt", 1, repeats)
    t_b, t_a = t_b / n, t_a / n
    agree = ((sk_a - sk_b).norm(dim=1) / sk_b.norm(dim=1).clamp(min=1e-30)).max().item()
    n_paper = 2 if args.quick else 4
    t_paper, d = time_paper_method(model, groups, pool[:n_paper], args.k, args.keep_ratio)
    peak_n = 64 if args.quick else 256
    rss_n = measure_peak(peak_n, args.kind, args.k, args.keep_ratio)
    rss_4n = measure_peak(4 * peak_n, args.kind, args.k, args.keep_ratio)
    result = {
        "device": "cpu", "threads": args.threads, "params": d, "pool": n, "responses_per_prompt": K,
        "seq_len": PROMPT_LEN + RESP_LEN, "k": args.k, "projector": args.kind, "keep_ratio": args.keep_ratio,
        "prompts_per_microbatch": args.ppm,
        "seconds_per_prompt": {"bare_fwd_bwd": t_bare, "mode_a_per_prompt": t_a, "mode_b_batched": t_b,
                               "paper_method": t_paper},
        "mode_a_vs_b_max_rel_diff": agree,
        "overhead_vs_bare": t_b / t_bare,
        "mode_a_overhead_vs_bare": t_a / t_bare,
        "speedup_vs_paper_method": t_paper / t_b,
        "peak_rss_mib": {str(peak_n): rss_n["peak_rss_mib"], str(4 * peak_n): rss_4n["peak_rss_mib"]},
        "peak_mem_growth_ratio": rss_4n["peak_rss_mib"] / rss_n["peak_rss_mib"],
        # growth of what scoring itself adds on top of imports, model and pool
        "scoring_mem_increment_mib": {str(peak_n): rss_n["peak_rss_mib"] - rss_n["rss_before_scoring_mib"],
                                      str(4 * peak_n): rss_4n["peak_rss_mib"] - rss_4n["rss_before_scoring_mib"]},
    }
    print(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
