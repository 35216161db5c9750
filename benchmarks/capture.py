"""Per-prompt gradient capture speed and memory: bare fwd+bwd vs capture modes vs the paper's method.

On a small Qwen2-style Megatron GPT (one process, TP=PP=1), a pool of N prompts × K = 8 responses,
seconds per prompt for

  (i)   bare forward+backward of the same micro-batches with no capture (the limit),
  (ii)  capture mode a (one backward per prompt, project each gradient shard, free it),
  (iii) capture mode b (many prompts per backward, frozen weights, per-layer per-prompt gradients),
  (iv)  the paper's method, as TRAK runs it: one backward per prompt, the whole gradient flattened and a
        random subset of q·d coordinates kept, then a dense Gaussian projection applied to a *batch* of
        prompts at once (``--paper-batch``, default the ``--ppm`` prompts of one mode-b micro-batch): the
        matrix is generated once per batch, block by block (L2-sized blocks of kept coordinates × k with
        ``normal_``, the blocking of ``DenseAnchor`` in ``projection.py``, the fastest straightforward
        variant measured there), each block multiplied into all the batch's gradients before the next is
        generated. As in TRAK's ``BasicProjector`` the generator is reseeded per call, so every batch sees
        the same matrix. One warm-up call precedes the timed ones. Generating the ``q·d × k`` entries is
        paid once per batch, so this anchor's time per prompt falls with the batch size; it is also
        measured with the whole pool as one batch (``paper_method_by_batch``),

all at the same k, measured side by side in one run (best of the repeats, after warm-up calls; (i)-(iii)
interleaved round by round).

Memory: the extra memory of scoring a pool of N and of 4N prompts (mode b through ``score_pool``, features
into a feature store), each in a fresh subprocess. After imports, model, projector and pool are built,
the child sets glibc to map every block >= 64 KiB with ``mmap`` and return it on free (and trims its
heap), so that resident memory follows live memory rather than what the allocator keeps; then it resets
the kernel's peak-RSS mark (``clear_refs``), reads ``VmRSS`` as the baseline, scores, and
reports ``VmHWM`` − baseline: the peak of what scoring adds (activations, per-prompt gradients, sketches,
the store's dirty pages), not the peak of the whole process. (``ru_maxrss``, used before, cannot be reset,
and Linux carries it across fork and exec: each child reported the parent's peak, 1317.6 MiB, set by the
old anchor's 630 MiB Gaussian blocks, for N and 4N alike, and an increment of 0.) Where ``clear_refs``
cannot be written, a 1 ms sampler of ``VmRSS`` takes the peak instead (``mem_method`` says which). CPU
tensors do not pass through Python's allocator, so ``tracemalloc`` would not see them.

    python benchmarks/capture.py --quick        # < 3 minutes on the 2-core CPU box

Writes ``benchmarks/results/capture[_quick].json`` (``--out``); the last line printed is a JSON object with
``overhead_vs_bare`` ((iii)/(i)), ``speedup_vs_paper_method`` ((iv)/(iii), at ``--paper-batch``),
``scoring_mem_increment_mib`` (at N and 4N) and ``peak_mem_growth_ratio`` (increment at 4N over at N).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
K = 8
PROMPT_LEN, RESP_LEN = 16, 16


def bench_model_config():
    from megatron_cropi.testing.tiny import tiny_model_config

    return tiny_model_config(
        "custom", vocab_size=512, max_sequence_length=64, tie_word_embeddings=False, rotary_base=10000.0,
        transformer=dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                         num_query_groups=2))


def make_pool(n, vocab, seed=0):
    from megatron_cropi.records import PromptRecord, Response, RolloutGroup

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


class PaperMethod:
    """(iv): the paper's per-prompt gradients, projected in batches with a dense Gaussian (see the module doc).

    ``__call__(groups)`` returns the ``[B, k]`` sketches of B prompts: one backward per prompt, the flattened
    gradient's kept coordinates gathered into a ``[B, m]`` matrix, then ``m × k`` Gaussian entries generated
    once, ``rows`` kept coordinates at a time, and multiplied into all B rows (scaled by 1/√k).
    """

    def __init__(self, model, groups, k, keep_ratio, seed=0, rows=None):
        from megatron_cropi.model.schedule import causal_attention_mask

        self.model, self.k, self.seed = model, k, seed
        self.params = list(model.parameters())
        self.d = sum(p.numel() for p in self.params)
        self.m = max(1, int(self.d * keep_ratio))
        gen = torch.Generator().manual_seed(seed)
        self.keep = torch.randperm(self.d, generator=gen)[: self.m].sort().values
        self.rows = rows or max(8, (1 << 18) // k)
        self.mask = causal_attention_mask(PROMPT_LEN + RESP_LEN, groups.device)
        self.seconds = {"backward": 0.0, "projection": 0.0}

    def gradients(self, batch):
        from megatron_cropi.model.logprobs import vocab_parallel_logprobs
        from megatron_cropi.popi.batch import pack_microbatches
        from megatron_cropi.popi.loss import popi_group_losses

        out = torch.empty(len(batch), self.m)
        for i, group in enumerate(batch):
            mb = pack_microbatches([group], [0], prompts_per_microbatch=1, responses_per_prompt=K,
                                   seq_length=PROMPT_LEN + RESP_LEN)[0]
            self.model.zero_grad(set_to_none=True)
            logits = self.model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=self.mask)
            lp = vocab_parallel_logprobs(logits, mb.labels)
            popi_group_losses(lp, mb.behaviour_logprobs, mb.mask, mb.rewards, mb.group_index, 1).sum().backward()
            out[i] = torch.cat([p.grad.reshape(-1) for p in self.params])[self.keep]
        self.model.zero_grad(set_to_none=True)
        return out

    def project(self, xk):
        gen = torch.Generator().manual_seed(self.seed)  # the same matrix for every batch
        out = torch.zeros(xk.shape[0], self.k)
        block = torch.empty(min(self.rows, self.m), self.k)
        for s in range(0, self.m, self.rows):
            e = min(self.m, s + self.rows)
            b = block[: e - s]
            b.normal_(generator=gen)
            out.addmm_(xk[:, s:e], b)
        return out.mul_(1.0 / math.sqrt(self.k))

    def __call__(self, batch):
        t0 = time.perf_counter()
        xk = self.gradients(batch)
        t1 = time.perf_counter()
        out = self.project(xk)
        t2 = time.perf_counter()
        self.seconds = {"backward": t1 - t0, "projection": t2 - t1}
        return out


def time_paper_method(anchor, pool, batch, repeats):
    """Best seconds per prompt of the anchor on the first ``batch`` prompts, and the share of that call
    spent generating and applying the matrix."""
    best, share = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        anchor(pool[:batch])
        dt = time.perf_counter() - t
        if dt < best:
            best, share = dt, anchor.seconds["projection"] / dt
    return best / batch, share


def _status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _tight_malloc():
    """glibc: mmap every block >= 64 KiB and give freed memory back, so that RSS follows live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)
    return True


class _RssSampler(threading.Thread):
    """Fallback peak meter where the peak-RSS mark cannot be reset: VmRSS every millisecond."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0.0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _status_mib("VmRSS"))
            time.sleep(1e-3)


def scoring_mem_child(n, kind, k, keep_ratio):
    """Score a pool of n prompts (mode b) into a feature store; print the extra memory of scoring (MiB)."""
    import gc

    from megatron_cropi.influence.feature_store import FeatureHeader, FeatureStore
    from megatron_cropi.influence.scorer import ScoringConfig, score_pool
    from megatron_cropi.projection.config import build_projector

    model, groups, cfg = setup()
    projector = build_projector(kind=kind, k=k, keep_ratio=keep_ratio, seed=0)
    pool = make_pool(n, cfg.vocab_size)
    with tempfile.TemporaryDirectory() as d:
        store = FeatureStore.open(os.path.join(d, "f"), FeatureHeader(num_rows=n, k=k, seed=0, projector=kind,
                                  param_set_hash="-", checkpoint_step=0, prompt_id_hash="-"))
        gc.collect()
        tight = _tight_malloc()
        rss_setup_peak = _status_mib("VmHWM")  # the peak of imports and model build, which ru_maxrss kept
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            sampler = None
        except OSError:
            sampler = _RssSampler()
        base = _status_mib("VmRSS")
        if sampler is not None:
            sampler.start()
        t = time.perf_counter()
        score_pool(pool, store, model=model, groups=groups, projector=projector,
                   cfg=ScoringConfig(prompts_per_microbatch=8, microbatches_per_call=2), temperature=1.0,
                   responses_per_prompt=K, progress=False)
        seconds = time.perf_counter() - t
        if sampler is None:
            peak = _status_mib("VmHWM")
        else:
            sampler.stop.set()
            sampler.join()
            peak = max(sampler.peak, _status_mib("VmRSS"))
    print(json.dumps({"increment_mib": peak - base, "peak_rss_mib": peak, "baseline_rss_mib": base,
                      "setup_peak_rss_mib": rss_setup_peak, "scoring_seconds": seconds,
                      "mem_method": ("VmHWM reset" if sampler is None else "VmRSS sampled 1 ms")
                      + (", tight malloc" if tight else "")}))


def measure_mem(n, kind, k, keep_ratio, threads):
    cmd = [sys.executable, __file__, "--mem-child", str(n), "--kind", kind, "--k", str(k),
           "--keep-ratio", str(keep_ratio), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="pool 32, memory at 64 and 256 prompts, best of 3 (paper method 2)")
    ap.add_argument("--n", type=int, default=None, help="pool size (prompts; default 32, 128 without --quick)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--kind", default="sjlt", help="fast projector for modes a/b")
    ap.add_argument("--keep-ratio", type=float, default=0.1)
    ap.add_argument("--ppm", type=int, default=8, help="prompts per micro-batch in mode b and (i)")
    ap.add_argument("--paper-batch", type=int, default=None,
                    help="prompts per projection call of the paper's method (default --ppm)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON (default benchmarks/results/capture[_quick].json)")
    ap.add_argument("--mem-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.mem_child is not None:
        return scoring_mem_child(args.mem_child, args.kind, args.k, args.keep_ratio)

    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.projection.config import build_projector

    t_start = time.perf_counter()
    n = args.n or (32 if args.quick else 128)
    repeats = 3 if args.quick else 5
    paper_repeats = 2 if args.quick else 3
    paper_batch = min(n, args.paper_batch or args.ppm)
    model, groups, cfg = setup()
    pool = make_pool(n, cfg.vocab_size)
    projector = build_projector(kind=args.kind, k=args.k, keep_ratio=args.keep_ratio, seed=0)
    mbs = pack_microbatches(pool, list(range(n)), prompts_per_microbatch=args.ppm, responses_per_prompt=K,
                            seq_length=PROMPT_LEN + RESP_LEN)
    time_bare(model, groups, mbs[:1], 1)  # warm-up
    t_bare = t_b = t_a = float("inf")
    for _ in range(repeats):  # (i)-(iii) interleaved round by round, so that load from others hits them alike
        t_bare = min(t_bare, time_bare(model, groups, mbs, 1) / n)
        t, sk_b = time_capture(model, groups, projector, pool, "batched", args.ppm, 1)
        t_b = min(t_b, t / n)
        t, sk_a = time_capture(model, groups, projector, pool, "per_prompt", 1, 1)
        t_a = min(t_a, t / n)
    agree = ((sk_a - sk_b).norm(dim=1) / sk_b.norm(dim=1).clamp(min=1e-30)).max().item()
    log(f"bare {t_bare:.4f} s/prompt, mode b {t_b:.4f}, mode a {t_a:.4f}")

    anchor = PaperMethod(model, groups, args.k, args.keep_ratio)
    anchor(pool[:1])  # warm-up
    paper = {}
    for b in sorted({paper_batch, n}):
        t, share = time_paper_method(anchor, pool, b, paper_repeats)
        paper[str(b)] = {"seconds_per_prompt": t, "projection_share": share, "speedup_of_mode_b": t / t_b}
        log(f"paper method, {b} prompts per projection: {t:.4f} s/prompt ({share:.0%} in the projection), "
            f"{t / t_b:.1f}x mode b")
    t_paper = paper[str(paper_batch)]["seconds_per_prompt"]

    mem_n = 64 if args.quick else 256
    mem = {str(m): measure_mem(m, args.kind, args.k, args.keep_ratio, args.threads) for m in (mem_n, 4 * mem_n)}
    inc = {m: v["increment_mib"] for m, v in mem.items()}
    log(f"scoring memory increment: {inc}")
    result = {
        "device": "cpu", "threads": args.threads, "params": anchor.d, "pool": n, "responses_per_prompt": K,
        "seq_len": PROMPT_LEN + RESP_LEN, "k": args.k, "projector": args.kind, "keep_ratio": args.keep_ratio,
        "prompts_per_microbatch": args.ppm, "paper_method_batch": paper_batch,
        "seconds_per_prompt": {"bare_fwd_bwd": t_bare, "mode_a_per_prompt": t_a, "mode_b_batched": t_b,
                               "paper_method": t_paper},
        "paper_method_by_batch": paper,
        "mode_a_vs_b_max_rel_diff": agree,
        "overhead_vs_bare": t_b / t_bare,
        "mode_a_overhead_vs_bare": t_a / t_bare,
        "speedup_vs_paper_method": t_paper / t_b,
        # extra memory of scoring on top of imports, model, projector and pool (see the module doc)
        "scoring_mem_increment_mib": inc,
        "peak_mem_growth_ratio": inc[str(4 * mem_n)] / inc[str(mem_n)],
        "scoring_mem": mem,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    path = args.out or RESULTS / ("capture_quick.json" if args.quick else "capture.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    print(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
