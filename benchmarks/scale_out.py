"""Scale-out scoring vs rank-0 scoring: per-rank memory and the bytes global rank 0 receives, by DP and pool size.

For each pool size N (a quarter of the prompts carry a gradient, the rest have all-equal rewards, as
the CPU default's pool does) and DP = 1, 2, 4 (TP = PP = 1, gloo), both paths score the same
trajectory store with the same tiny model and then meet for selection:

* ``rank0``: :func:`~megatron_cropi.influence.stores.score_store` (every rank reads the whole pool's
  rollouts; each chunk's k-vectors are gathered to global rank 0, which writes the store), then the
  selection inputs rank 0 reads (the ``[N, k]`` matrix).
* ``scale_out``: :func:`~megatron_cropi.influence.scale_out.score_store_sharded` (per-row scalars, the
  rollouts of the units a replica takes, its own shard), then the cropi selection of 10% where the
  cosines are (:func:`~megatron_cropi.curriculum.scaled_selection.select_where_scored`: a distributed
  top-m, counts meet) and written in parts (:func:`~.write_where_scored`: each rank its picks, rank 0 a
  head of summed counts), as ``cropi run`` and ``cropi select`` select.
* ``scale_out_met``: the same scoring, then every scored row's cosine met on rank 0
  (:func:`~megatron_cropi.influence.scale_out.pool_cosines`), as the other policies select.

Measured per rank: ``rss_mib``, the rise of peak resident memory over the process's memory before
scoring (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; glibc told to return freed
blocks); and ``anon_mib``, the rise of anonymous memory (``RssAnon``, peak over unit boundaries and the
end: what the rank itself holds between units, indices, plans, columns and scores, with what the
allocators keep of freed blocks), per prompt from the smallest pool to the largest in
``rank_anon_bytes_per_prompt``. The rest of the peak's rise is the trajectory store's pages mapped from
the page cache while it is scored (clean, shared by the ranks of a node, reclaimable; unmapped with the
store: ``file_mib_at_end`` is the rise of ``RssFile`` once the path has returned); ``bytes_to_rank0``, counted at the collective calls while the path runs (the pickled payload
of every ``gather_object``/``all_gather_object`` that rank 0 receives from another rank, and the bytes of
every tensor ``all_reduce``/``broadcast`` it takes part in as a receiver), over the whole path and over
its selection step alone (``select_bytes_to_rank0``). Every other rank's figures are reported too
(``max_other_rank``).

    OMP_NUM_THREADS=1 python benchmarks/scale_out.py --quick   # N in {512, 2048}, ~5 minutes on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/scale_out.py           # N in {512, 2048, 8192}
    OMP_NUM_THREADS=1 python benchmarks/scale_out.py --pools 512,2048,8192,32768 --dp 1,4   # ~17 minutes

Writes ``benchmarks/results/scale_out[_quick].json``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
K, VOCAB_LEN, RESPONSE = 8, 6, 24
RATIO = 0.1  # the share of the pool selected
MIB = 1024 ** 2
PATHS = ("rank0", "scale_out", "scale_out_met")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _write_pool(path: Path, n: int, vocab: int) -> None:
    from megatron_cropi.records import PromptRecord, Response, RolloutGroup, SamplingParams
    from megatron_cropi.rollout.store import StoreHeader, TrajectoryStore

    rng = np.random.default_rng(0)
    store = TrajectoryStore.open_for_append(path, StoreHeader.build(
        SamplingParams(n=K), tokenizer="t", model="m", policy_version=0, pool_hash=f"n{n}", num_prompts=n))
    batch = []
    for i in range(n):
        # ids of 32 hex characters, as data.prompt_ids.prompt_id gives them
        prompt = PromptRecord(f"{i:032x}", rng.integers(1, vocab, 12).astype(np.int32), "", source=f"f{i % 4}")
        resps = tuple(Response(rng.integers(1, vocab, t).astype(np.int32), (-rng.uniform(1, 3, t)).astype(np.float32))
                      for t in rng.integers(RESPONSE // 2, RESPONSE + 1, K))
        live = i % 4 == 0
        rewards = rng.permutation(np.r_[np.ones(K // 2), np.zeros(K - K // 2)]) if live else np.zeros(K)
        batch.append(RolloutGroup(prompt, resps, rewards.astype(np.float32)))
        if len(batch) == 512:
            store.append(batch)
            batch = []
    store.append(batch)
    store.mark_complete()


class _Meter:
    """Bytes this rank receives from others at the collective calls (see the module docstring)."""

    def __init__(self, dist):
        self.dist, self.received, self._orig = dist, 0, {}

    def __enter__(self):
        d = self.dist
        for name in ("gather_object", "all_gather_object", "all_reduce", "broadcast", "broadcast_object_list"):
            self._orig[name] = getattr(d, name)

        def gather_object(obj, object_gather_list=None, dst=0, group=None):
            sizes = [None] * d.get_world_size()
            self._orig["all_gather_object"](sizes, len(pickle.dumps(obj)))
            if d.get_rank() == dst:
                self.received += sum(sizes) - sizes[d.get_rank()]
            return self._orig["gather_object"](obj, object_gather_list, dst=dst, group=group)

        def all_gather_object(object_list, obj, group=None):
            out = self._orig["all_gather_object"](object_list, obj, group=group)
            self.received += sum(len(pickle.dumps(o)) for i, o in enumerate(object_list) if i != d.get_rank())
            return out

        def all_reduce(tensor, *args, **kwargs):
            self.received += tensor.numel() * tensor.element_size()
            return self._orig["all_reduce"](tensor, *args, **kwargs)

        def broadcast(tensor, src=None, *args, **kwargs):
            if src != d.get_rank():
                self.received += tensor.numel() * tensor.element_size()
            return self._orig["broadcast"](tensor, src, *args, **kwargs)

        def broadcast_object_list(object_list, src=0, *args, **kwargs):
            out = self._orig["broadcast_object_list"](object_list, src, *args, **kwargs)
            if src != d.get_rank():
                self.received += len(pickle.dumps(object_list))
            return out

        for name, fn in (("gather_object", gather_object), ("all_gather_object", all_gather_object),
                         ("all_reduce", all_reduce), ("broadcast", broadcast),
                         ("broadcast_object_list", broadcast_object_list)):
            setattr(d, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(self.dist, name, fn)


def _worker(pool: str, out_dir: str, path: str):
    import torch.distributed as dist

    from megatron_cropi.curriculum.scaled_selection import select_where_scored, write_where_scored
    from megatron_cropi.curriculum.steps import _usable, pool_columns
    from megatron_cropi.influence.feature_store import FeatureStore
    from megatron_cropi.influence.scale_out import pool_cosines, score_store_sharded
    from megatron_cropi.influence.scorer import ScoringConfig
    from megatron_cropi.influence.stores import PolicyScorer, score_store
    from megatron_cropi.selection.policies import SelectionConfig, TargetPlan
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    groups = build_parallel_groups(1, 1)
    model = build_tiny_model(tiny_model_config(), groups, seed=6)
    cfg = ScoringConfig(prompts_per_microbatch=8, microbatches_per_call=2)
    scorer = PolicyScorer(model, groups, build_projector(kind="sjlt", k=1024, seed=1), cfg, projection_seed=1,
                          checkpoint_step=0, pad_id=0)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: large blocks go back to the OS when freed
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_mib("VmRSS")
    base_anon, base_file = _status_mib("RssAnon"), _status_mib("RssFile")
    anon_peak = [base_anon]

    def sample():  # at unit boundaries: what the rank holds between units, not a unit's activations
        anon_peak[0] = max(anon_peak[0], _status_mib("RssAnon"))

    t0 = time.perf_counter()
    direction = np.ones(scorer.projector.k)
    with _Meter(dist) as meter:
        if path == "rank0":
            score_store(Path(pool), Path(out_dir), scorer, on_chunk=sample)
        else:
            score_store_sharded(Path(pool), Path(out_dir), scorer, on_unit=sample)
        with _Meter(dist) as select_meter:
            if path == "rank0":
                if dist.get_rank() == 0:  # what selection reads on rank 0
                    _usable(FeatureStore.load(out_dir))
            elif path == "scale_out_met":
                pool_cosines(Path(out_dir), {"target:t": direction})
            else:
                inputs = pool_columns([], Path(pool), set())  # every rank reads the columns itself
                n = len(inputs.prompt_ids)
                plan = TargetPlan(directions={"target:t": direction}, targets={}, skipped={})
                done, picks = select_where_scored(SelectionConfig(policy="cropi", ratio=RATIO), plan, Path(out_dir),
                                                  num_prompts=n, budget=int(RATIO * n))
                assert done
                write_where_scored(0, picks, inputs, Path(f"{out_dir}_selection") / "stage0.json",
                                   t0=time.perf_counter())
    seconds = time.perf_counter() - t0
    sample()
    rss = _status_mib("VmHWM") - base
    file_mib = _status_mib("RssFile") - base_file  # at the end: the scored store is closed by then
    destroy_parallel_groups()
    # the selection's calls pass through both meters: the outer one's count already holds them
    return {"rss_mib": rss, "anon_mib": anon_peak[0] - base_anon, "file_mib_at_end": file_mib,
            "bytes_received": meter.received,
            "select_bytes_received": select_meter.received, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pools of 512 and 2048 prompts")
    ap.add_argument("--dp", default="1,2,4")
    ap.add_argument("--pools", default=None, help="pool sizes, e.g. 512,8192,32768 (default 512,2048,8192)")
    ap.add_argument("--out", default=None, help="result file name under benchmarks/results/")
    ap.add_argument("--paths", default=",".join(PATHS), help="which paths to run (default all)")
    args = ap.parse_args()
    from megatron_cropi.testing.spawn import run_ranks
    from megatron_cropi.testing.tiny import tiny_model_config

    sizes = (512, 2048) if args.quick else (512, 2048, 8192)
    if args.pools:
        sizes = tuple(int(x) for x in args.pools.split(","))
    dps = [int(x) for x in args.dp.split(",")]
    paths = [p for p in args.paths.split(",") if p in PATHS]
    tmp = Path(tempfile.mkdtemp(prefix="scale_out_"))
    rows = []
    try:
        for n in sizes:
            _write_pool(tmp / f"pool{n}", n, tiny_model_config().vocab_size)
            for dp in dps:
                for path in paths:  # interleaved: load affects all alike
                    out = tmp / f"f_{n}_{dp}_{path}"
                    res = run_ranks(_worker, dp, args=(str(tmp / f"pool{n}"), str(out), path), timeout_s=1800)
                    row = {"pool": n, "dp": dp, "path": path, "rank0_rss_mib": round(res[0]["rss_mib"], 1),
                           "bytes_to_rank0": int(res[0]["bytes_received"]),
                           "select_bytes_to_rank0": int(res[0]["select_bytes_received"]),
                           "max_other_rank_rss_mib": round(max([r["rss_mib"] for r in res[1:]], default=0.0), 1),
                           "max_rank_anon_mib": round(max(r["anon_mib"] for r in res), 2),
                           "rank0_anon_mib": round(res[0]["anon_mib"], 2),
                           "max_other_rank_anon_mib": round(max([r["anon_mib"] for r in res[1:]], default=0.0), 2),
                           "max_rank_file_mib_at_end": round(max(r["file_mib_at_end"] for r in res), 1),
                           "max_other_rank_bytes": int(max([r["bytes_received"] for r in res[1:]], default=0)),
                           "seconds": round(max(r["seconds"] for r in res), 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(f"{out}_selection", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def pick(path, key, n, dp):
        return next(r[key] for r in rows if r["path"] == path and r["pool"] == n and r["dp"] == dp)

    lo, hi, top = sizes[0], sizes[-1], max(dps)
    multi = min((d for d in dps if d > 1), default=top)
    summary = {
        "benchmark": "scale_out", "k": 1024, "responses_per_prompt": K, "live_fraction": 0.25, "ratio": RATIO,
        "pools": list(sizes),
        "dp": dps, "rows": rows,
        "rank0_bytes_growth_with_pool": {p: pick(p, "bytes_to_rank0", hi, top) / max(pick(p, "bytes_to_rank0", lo, top), 1)
                                         for p in paths},
        # from the smallest DP > 1 (at DP = 1 nothing crosses ranks) to the largest
        "rank0_bytes_growth_with_dp": {p: pick(p, "bytes_to_rank0", hi, top) / max(pick(p, "bytes_to_rank0", hi, multi), 1)
                                       for p in paths},
        "rank0_bytes_per_live_row_at_largest": {p: pick(p, "bytes_to_rank0", hi, top) / (0.25 * hi * (top - 1) / top)
                                                for p in paths},
        "rank_rss_growth_mib_with_pool": {p: pick(p, "max_other_rank_rss_mib", hi, top) - pick(p, "max_other_rank_rss_mib", lo, top)
                                          for p in paths},
        # anonymous memory (what a rank holds: indices, plans, scores) apart from the store's pages mapped
        # from the page cache (clean, shared by the ranks of a node, given back under pressure)
        "rank_anon_bytes_per_prompt": {p: (pick(p, "max_rank_anon_mib", hi, top) - pick(p, "max_rank_anon_mib", lo, top))
                                       * MIB / (hi - lo) for p in paths},
        # the same for the ranks other than global rank 0 (which alone plans the units and writes the head)
        "other_rank_anon_bytes_per_prompt": {p: (pick(p, "max_other_rank_anon_mib", hi, top)
                                                 - pick(p, "max_other_rank_anon_mib", lo, top)) * MIB / (hi - lo)
                                             for p in paths},
        "rank0_select_bytes_at_largest": {p: pick(p, "select_bytes_to_rank0", hi, top) for p in paths},
        "rank0_select_bytes_growth_with_pool": {p: pick(p, "select_bytes_to_rank0", hi, top)
                                                / max(pick(p, "select_bytes_to_rank0", lo, top), 1) for p in paths},
        "rank0_bytes_at_largest": {p: pick(p, "bytes_to_rank0", hi, top) for p in paths},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / (args.out or f"scale_out{'_quick' if args.quick else ''}.json")).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
