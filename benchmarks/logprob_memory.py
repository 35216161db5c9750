"""Peak memory of one scoring micro-batch's log-prob (and GRPO's log-prob + entropy), whole vs chunked.

One micro-batch of ``--rows`` sequences × ``--seq`` positions over a ``--vocab`` slice (V/TP) of bf16
logits, as the last pipeline stage's output layer hands them to the loss: forward of
:func:`megatron_cropi.model.logprobs.vocab_parallel_logprobs` (``scoring``; ``grpo`` adds
:func:`~megatron_cropi.model.logprobs.vocab_parallel_entropy`), a weighted sum, backward to the
logits. Each case runs in a fresh subprocess with ``chunk_tokens = 0`` (the whole-tensor path, before)
and ``--chunk`` (after).

What is measured: the child sets glibc to ``mmap`` every block >= 64 KiB and return it on free (so
resident memory follows live memory, not what the allocator keeps), allocates the logits, resets the
kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5), reads ``VmRSS`` as the baseline, runs forward
+ backward, and reports ``VmHWM − baseline``: the peak of what the log-prob work adds on top of the
logits, the logits' gradient included (torch's CPU tensors bypass Python's allocator, so
``tracemalloc`` would not see them). Where ``clear_refs`` cannot be written a 1 ms ``VmRSS`` sampler
takes the peak instead (``mem_method`` says which). ``estimate_mib`` is ``memory_activations.logits_bytes`` for
the same shape minus the logits, the part the measurement covers.

    OMP_NUM_THREADS=1 python benchmarks/logprob_memory.py          # ~1 minute on the 2-core CPU box

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

MIB = 1024 ** 2


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


def child(rows, seq, vocab, chunk, entropy):
    """Forward + backward of one micro-batch's log-prob (+ entropy); print the peak increment (MiB)."""
    import gc

    import torch

    from megatron_cropi.model.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, seq, vocab, generator=gen).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows, seq), generator=gen)
    weights = torch.randn(rows, seq, generator=gen)
    gc.collect()
    tight = _tight_malloc()
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
    loss = (weights * vocab_parallel_logprobs(logits, targets, chunk_tokens=chunk)).sum()
    if entropy:
        loss = loss - 0.001 * vocab_parallel_entropy(logits, chunk_tokens=chunk).sum()
    loss.backward()
    seconds = time.perf_counter() - t
    if sampler is None:
        peak = _status_mib("VmHWM")
    else:
        sampler.stop.set()
        sampler.join()
        peak = max(sampler.peak, _status_mib("VmRSS"))
    print(json.dumps({"increment_mib": round(peak - base, 1), "seconds": round(seconds, 2),
                      "mem_method": ("VmHWM reset" if sampler is None else "VmRSS sampled 1 ms")
                      + (", tight malloc" if tight else "")}))


def measure(args, chunk, entropy):
    cmd = [sys.executable, __file__, "--child", "--rows", str(args.rows), "--seq", str(args.seq),
           "--vocab", str(args.vocab), "--chunk", str(chunk)] + (["--entropy"] if entropy else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8, help="sequences in the micro-batch (prompts × K)")
    p.add_argument("--seq", type=int, default=512, help="padded sequence length")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary slice of this TP rank (V/TP)")
    p.add_argument("--chunk", type=int, default=1024, help="chunk_tokens of the chunked path")
    p.add_argument("--entropy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.rows, args.seq, args.vocab, args.chunk, args.entropy)
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_cropi.memory_activations import logits_bytes

    logits_mib = args.rows * args.seq * args.vocab * 2 / MIB
    result = {"what": "peak RSS added by one micro-batch's log-prob forward+backward on top of its bf16 logits "
                      "(the logits' gradient included), fresh process per case, CPU",
              "rows": args.rows, "seq": args.seq, "vocab_slice": args.vocab, "chunk_tokens": args.chunk,
              "logits_mib": round(logits_mib, 1)}
    for name, entropy in (("scoring", False), ("grpo_with_entropy", True)):
        before, after = measure(args, 0, entropy), measure(args, args.chunk, entropy)
        est = {c: logits_bytes(args.vocab, tp=1, seq=args.seq, micro_batch=args.rows, fp32_copies=5 if entropy else 3,
                               chunk_tokens=c, logit_grads=2 if entropy else 1) / MIB - logits_mib
               for c in (0, args.chunk)}
        result[name] = {"before_mib": before["increment_mib"], "after_mib": after["increment_mib"],
                        "ratio": round(before["increment_mib"] / max(after["increment_mib"], 1e-9), 2),
                        "estimate_before_mib": round(est[0], 1), "estimate_after_mib": round(est[args.chunk], 1),
                        "seconds_before": before["seconds"], "seconds_after": after["seconds"]}
        result["mem_method"] = after["mem_method"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
