"""The weight push to vLLM: bytes moved and peak extra memory per rank, before and after, TP=2 and DP=2.

* ``before``: the push of HEAD ``b2d43ef`` (before colocated engines), kept callable here as it was:
  ``list(megatron_to_hf_named_tensors(model, groups, dst=None if dp > 1 else 0))`` — every tensor
  reassembled by a world-wide int32 sum (``all_reduce`` when DP > 1, so every rank receives the whole
  model and keeps it as a list on CPU; ``reduce`` to rank 0 otherwise) — then handed to the engine.
* ``after``: :func:`megatron_cropi.grpo.weight_sync.iter_hf_weight_buckets` streamed into the engine:
  TP all-gather of the training-dtype bytes per bucket within the rank's TP group, PP broadcast per
  bucket, nothing over DP, no reduce; at TP = PP = 1 the parameters themselves (no copy).

The engine is a sink that takes each HF tensor as vLLM's ``load_weights`` would (reads it once,
keeps nothing), so the figures are the push's own. Each (layout, variant) runs in a fresh 2-rank gloo
world on a bf16 Qwen2-shaped model (``--hidden``, ``--layers``, ``--vocab``; default ~118 M parameters,
235 MB). Per rank:

* ``payload_mb``: tensor bytes handed to collectives (each ``all_reduce``/``reduce``'s tensor, each
  ``all_gather``'s output list, each ``broadcast``'s tensor; object collectives by pickled size);
* ``wire_mb``: bytes a rank sends + receives under ring algorithms over n ranks (all-reduce 4(n−1)/n·S,
  reduce 2(n−1)/n·S, all-gather 2(n−1)/n·S of the gathered size S, broadcast S; object collectives as
  their pickled size × n);
* ``peak_extra_mb``: peak resident memory during the push minus the resident memory before it, sampled
  every millisecond (``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors leave the resident set).

    python benchmarks/weight_push.py [--quick] [--bucket-mb 32]

Last line: one JSON object ``{"tp2": {"before": {...}, "after": {...}}, "dp2": {...}, ...}``; also
written to ``benchmarks/results/weight_push[_quick].json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Highest resident set size seen by a 1 ms sampling thread while the block runs."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


class _Traffic:
    """Counts the bytes of every torch.distributed collective called while installed (this rank)."""

    NAMES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list")

    def __init__(self):
        self.payload = self.wire = 0

    def _size(self, group):
        import torch.distributed as dist

        return dist.get_world_size(group)

    def __enter__(self):
        import torch.distributed as dist

        self._orig = {n: getattr(dist, n) for n in self.NAMES}

        def nbytes(t):
            return t.numel() * t.element_size()

        def wrap(name, fn):
            def counted(*args, **kwargs):
                group = kwargs.get("group")
                n = self._size(group)
                if name in ("all_reduce", "reduce", "broadcast"):
                    s = nbytes(args[0])
                    self.payload += s
                    self.wire += {"all_reduce": 4 * (n - 1) * s // n, "reduce": 2 * (n - 1) * s // n, "broadcast": s}[name]
                elif name == "all_gather":
                    s = sum(nbytes(t) for t in args[0])
                    self.payload += s
                    self.wire += s * (n - 1) // n * 2
                else:
                    s = len(pickle.dumps(args[1] if name == "all_gather_object" else args[0])) * n
                    self.payload += s
                    self.wire += s
                return fn(*args, **kwargs)
            return counted

        for n in self.NAMES:
            setattr(dist, n, wrap(n, self._orig[n]))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for n, fn in self._orig.items():
            setattr(dist, n, fn)


def _sink(stream) -> tuple[int, int]:
    """What vLLM's load_weights does with each tensor, minus the copy into its own: read it once."""
    count = total = 0
    for _, t in stream:
        total += t.numel() * t.element_size()
        float(t.reshape(-1)[:: max(1, t.numel() // 64)].float().sum())
        count += 1
    return count, total


def _worker(tp: int, variant: str, model_kw: dict, bucket_bytes: int):
    import torch.distributed as dist

    from megatron_cropi.checkpoint import megatron_to_hf_named_tensors
    from megatron_cropi.grpo.weight_sync import iter_hf_weight_buckets
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    g = build_parallel_groups(tp, 1)
    cfg = tiny_model_config("custom", params_dtype="bfloat16", vocab_size=model_kw["vocab"], max_sequence_length=256,
                            tie_word_embeddings=True, rotary_base=1e6,
                            transformer=dict(num_layers=model_kw["layers"], hidden_size=model_kw["hidden"],
                                             ffn_hidden_size=model_kw["ffn"], num_attention_heads=16,
                                             num_query_groups=4))
    model = build_tiny_model(cfg, g, seed=1)
    local_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    gc.collect()
    dist.barrier()
    with _PeakRSS() as mem, _Traffic() as traffic:
        t0 = time.perf_counter()
        if variant == "before":  # HEAD b2d43ef's VLLMWeightPush.push, in-place branch
            named = list(megatron_to_hf_named_tensors(model, g, dst=None if g.dp_size > 1 else 0))
            received = _sink(named) if named else (0, 0)
            del named
        else:
            received = _sink(iter_hf_weight_buckets(model, g, bucket_bytes=bucket_bytes))
        seconds = time.perf_counter() - t0
    dist.barrier()
    return {"payload_mb": round(traffic.payload / 2**20, 1), "wire_mb": round(traffic.wire / 2**20, 1),
            "peak_extra_mb": round((mem.peak - mem.base) / 2**20, 1), "seconds": round(seconds, 2),
            "tensors_received": received[0], "received_mb": round(received[1] / 2**20, 1),
            "local_params_mb": round(local_mb, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~25 M-parameter model")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--bucket-mb", type=float, default=32.0)
    args = ap.parse_args()
    from megatron_cropi.testing.spawn import run_ranks

    model_kw = dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab, ffn=args.hidden * 11 // 4)
    if args.quick:
        model_kw.update(hidden=512, vocab=16384, ffn=1408)
    bucket = int(args.bucket_mb * 2**20)
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result: dict = {"model": model_kw, "dtype": "bfloat16", "bucket_mb": args.bucket_mb,
                    "before_is": "HEAD b2d43ef VLLMWeightPush.push (megatron_to_hf_named_tensors, int32 sum)"}
    for name, tp in (("tp2", 2), ("dp2", 1)):
        result[name] = {}
        for variant in ("before", "after"):
            print(f"{name} {variant} ...", file=sys.stderr, flush=True)
            ranks = run_ranks(_worker, 2, args=(tp, variant, model_kw, bucket), env=env, timeout_s=600)
            result[name][variant] = {f"rank{r}": v for r, v in enumerate(ranks)}
        b, a = result[name]["before"], result[name]["after"]
        result[name]["max_wire_mb"] = {v: max(x["wire_mb"] for x in result[name][v].values()) for v in ("before", "after")}
        result[name]["max_peak_extra_mb"] = {v: max(x["peak_extra_mb"] for x in result[name][v].values())
                                             for v in ("before", "after")}
        del b, a
    out = Path(__file__).parent / "results" / f"weight_push{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
