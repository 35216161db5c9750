"""Projection speed: gradient elements/s, GB/s read and peak memory of every backend, against two
anchors and the machine's plain read bandwidth, all measured in the same run.

* ``read``: ``x.sum()`` over the same ``[B, d]`` float32 gradient: the physical limit (reading the
  gradient once). Every backend is also reported as a fraction of it.
* ``dense_anchor``: the straightforward paper method: keep ``q·d`` coordinates (``randperm``), then
  the Gaussian matrix materialised block by block (``normal_``; L2-sized blocks of kept coordinates,
  the fastest straightforward variant we tried) and a matmul per block.
* ``trak_basic``: TRAK's own ``BasicProjector`` (package ``traker``) on the same kept coordinates,
  when it imports (``--no-deps`` install; it must not change torch). Absent otherwise, with the reason.
* ``gaussian`` / ``rademacher`` / ``sjlt`` (s = ``--sjlt-s``): :mod:`megatron_cropi.projection`.

Within a configuration the timed calls are interleaved round by round (best of ``--repeats`` for read
and sjlt, ``--slow-repeats`` for the rest), so load from other processes affects them alike.

Peak memory is the rise of the process's peak RSS (``VmHWM``, reset before one extra call during which
glibc returns large blocks to the OS) or ``torch.cuda.max_memory_allocated`` on GPU, over the inputs. Slow
backends run once outside the target config and are skipped where their estimated time exceeds
``--budget-s`` (the estimate is reported); ``rademacher`` (the gaussian code path) runs at the target of
the full run only.
``sjlt_precision_gap_pts`` (precision@10% of gaussian − sjlt at keep 0.1, k 4096, in points) comes
from :mod:`rank_preservation` on the quick model's per-sequence gradients, 16 seeds (its standard
error is reported: with 5 seeds it is ~2 points, too coarse for a 2-point target).

    python benchmarks/projection.py --quick         # < 3 minutes on the 2-core CPU box
    python benchmarks/projection.py                 # d up to 1e8, k in {4096, 32768}, B in {1, 8, 32}
    python benchmarks/projection.py --device cuda   # GB/s against the GPU's memory bandwidth

Writes ``benchmarks/results/projection[_quick|_cuda].json``; the last line printed is a JSON object
with at least ``sjlt_speedup_vs_dense``, ``sjlt_fraction_of_read_bandwidth``,
``gaussian_speedup_vs_dense`` and ``sjlt_precision_gap_pts`` (at d = 4e6, k = 4096, B = 8).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = (4_000_000, 4096, 8)  # (d, k, B) of the targets
SLOW = ("gaussian", "rademacher", "dense_anchor", "trak_basic")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timing and memory
class Meter:
    """Best-of-N wall time and peak extra memory of a call, on CPU or CUDA.

    On CPU the timed calls run with glibc's steady-state behaviour (blocks up to 32 MiB reused from
    the heap, as the default dynamic mmap threshold converges to); one extra call then measures the
    peak with every block >= 64 KiB mapped and returned on free, so that ``VmHWM`` tracks live memory.
    """

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self, device: torch.device):
        self.device = device
        try:
            self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None
        except OSError:
            self.libc = None
        self._malloc(tight=False)

    def _malloc(self, tight: bool):
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, (1 << 16) if tight else (32 << 20))
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 0 if tight else (1 << 30))
            if tight:
                self.libc.malloc_trim(0)  # hand the heap's free blocks back before measuring

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @staticmethod
    def _status_mb(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def _reset_peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self._status_mb("VmRSS")

    def _peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return self._status_mb("VmHWM")

    def best_times(self, fns: dict, repeats: int) -> dict:
        """Best seconds of each callable over ``repeats`` rounds, the callables interleaved within a
        round so that load from other processes hits them alike."""
        best = {name: float("inf") for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                self._sync()
                t0 = time.perf_counter()
                fn()
                self._sync()
                best[name] = min(best[name], time.perf_counter() - t0)
        return best

    def peak_mb(self, fn) -> float:
        """Peak extra MiB of one call."""
        self._malloc(tight=True)
        base = self._reset_peak()
        fn()
        self._sync()
        peak = self._peak() - base
        self._malloc(tight=False)
        return peak


# ---------------------------------------------------------------- anchors
class DenseAnchor:
    """Kept coordinates by ``randperm``, then the Gaussian matrix materialised block by block with
    ``normal_`` (blocks of ``rows`` kept coordinates × k, L2-resident, the same blocking as our
    gaussian backend) and a matmul per block. Of the straightforward variants tried (column blocks of
    16-160 MiB as in TRAK's BasicProjector, row blocks of 64 or 1024), this was the fastest."""

    def __init__(self, d: int, k: int, keep: float, seed: int, device: torch.device, rows: int | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.m = max(1, int(round(keep * d)))
        self.idx = torch.randperm(d, generator=gen)[: self.m].sort().values.to(device)
        self.k = k
        self.rows = rows or max(8, (1 << 18) // k)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        xk = x2d.index_select(1, self.idx).float()
        out = torch.zeros(x2d.shape[0], self.k, device=self.device)
        block = torch.empty(min(self.rows, self.m), self.k, device=self.device)
        for s in range(0, self.m, self.rows):
            e = min(self.m, s + self.rows)
            b = block[: e - s]
            b.normal_(generator=self.gen)
            out.addmm_(xk[:, s:e], b)
        return out


def trak_factory(m: int, k: int, seed: int, device: torch.device):
    """TRAK's BasicProjector over the m kept coordinates, or ``(None, reason)``."""
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except Exception as err:  # noqa: BLE001 - any import failure means the anchor is absent
        return None, f"traker does not import: {type(err).__name__}: {err}"
    proj = BasicProjector(grad_dim=m, proj_dim=k, seed=seed, proj_type=ProjectionType.normal, device=str(device),
                          block_size=100, dtype=torch.float32)
    return proj, "measured"


# ---------------------------------------------------------------- the grid
def measure_config(d, k, batch, args, meter, calib, device) -> dict:
    from megatron_cropi.projection import ProjectionConfig, ShardSpec, build_projector

    rows = 2000 if d % 2000 == 0 else 1
    shape = (rows, d // rows)
    x = torch.randn(batch, *shape, device=device)
    x2d = x.view(batch, d)
    spec = ShardSpec.whole("decoder.layers.0.mlp.linear_fc1.weight", shape)
    gb = batch * d * 4 / 1e9
    m = int(round(args.keep * d))
    entries = m * k
    is_target = (d, k, batch) == TARGET
    res = {"d": d, "k": k, "B": batch, "keep_ratio": args.keep, "gradient_gb": gb, "backends": {}}
    extra: dict[str, dict] = {}

    def prepare(name):
        proj = build_projector(ProjectionConfig(kind=name, k=k, keep_ratio=args.keep, seed=0, sjlt_s=args.sjlt_s))
        t0 = time.perf_counter()
        proj.index_data(spec, device)  # the one-off index build, outside the timed calls
        extra[name] = {"index_build_s": time.perf_counter() - t0, "index_cache_mb": proj.cache_nbytes() / 2**20}
        return lambda: proj.project(x, spec)

    fast = {"read": lambda: x.sum(), "sjlt": prepare("sjlt")}
    slow = {}
    for name in ("gaussian", "rademacher"):
        if name == "rademacher" and (args.quick or not is_target):  # the gaussian path, another table
            res["backends"][name] = {"skipped": "same code path as gaussian; measured at the target config of "
                                                "the full run only"}
        elif _affordable(name, entries, batch, args, calib, is_target, res):
            slow[name] = prepare(name)
    if _affordable("dense_anchor", entries, batch, args, calib, is_target, res):
        anchor = DenseAnchor(d, k, args.keep, 0, device)
        slow["dense_anchor"] = lambda: anchor(x2d)
    if args.trak and _affordable("trak_basic", entries, batch, args, calib, is_target, res):
        idx = torch.randperm(d, generator=torch.Generator().manual_seed(1))[:m].sort().values.to(device)
        trak, status = trak_factory(m, k, 0, device)
        if trak is None:
            res["backends"]["trak_basic"] = {"absent": status}
            args.trak = False
            log(f"  trak_basic absent: {status}")
        else:
            slow["trak_basic"] = lambda: trak.project(x2d.index_select(1, idx), model_id=0)
    times = meter.best_times(fast, args.repeats)
    times.update(meter.best_times(slow, args.slow_repeats if is_target else 1))
    for name, fn in {**fast, **slow}.items():
        t = times[name]
        peak = meter.peak_mb(fn)
        entry = {"seconds": t, "elements_per_s": batch * d / t, "gb_per_s": gb / t, "peak_extra_mb": round(peak, 1),
                 "fraction_of_read": times["read"] / t, **extra.get(name, {})}
        res["backends"][name] = entry
        if name in SLOW:
            calib.setdefault(name, t / (entries * (2 + batch / 8)))
        log(f"  d={d:.0e} k={k} B={batch:<2d} {name:>13s}: {t * 1e3:10.2f} ms  {gb / t:8.3f} GB/s  "
            f"{times['read'] / t:6.1%} of read  peak +{peak:.0f} MiB")
    return res


def _affordable(name, entries, batch, args, calib, is_target, res) -> bool:
    """Slow backends: always at the target config, elsewhere only if the estimate fits the budget."""
    if is_target:
        return True
    if args.quick:
        res["backends"][name] = {"skipped": "quick mode measures the slow backends at the target config only"}
        return False
    if name not in calib:
        return True
    est = calib[name] * entries * (2 + batch / 8)
    if est > args.budget_s:
        res["backends"][name] = {"skipped": f"estimated {est:.0f} s > budget {args.budget_s:.0f} s",
                                 "estimated_seconds": est}
        log(f"  d={res['d']:.0e} k={res['k']} B={batch:<2d} {name:>13s}: skipped (est. {est:.0f} s)")
        return False
    return True


def precision_gap(k: int, seeds: int) -> dict:
    """precision@10% of gaussian and sjlt at keep 0.1 on the quick model's per-sequence gradients."""
    import rank_preservation as rp

    grads, target_sets = rp.lm_gradients("quick", log=log)
    backends = {"gaussian": rp.BACKENDS["gaussian"], "sjlt": rp.BACKENDS["sjlt"]}
    res = rp.rank_preservation(grads, target_sets, k=k, keep_ratios=(0.1,), seeds=tuple(range(seeds)),
                               backends=backends, log=log)
    g, s = res["gaussian"]["0.1"], res["sjlt"]["0.1"]
    return {"gaussian": g["mean"], "sjlt": s["mean"], "gap_pts": 100 * (g["mean"] - s["mean"]),
            "gap_se_pts": 100 * math.sqrt((g["std"] ** 2 + s["std"] ** 2) / max(1, seeds - 1)), "k": k,
            "keep_ratio": 0.1, "seeds": seeds,
            "num_parameters": sum(v[0].numel() for v in grads.values())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d = 4e6 only; gaussian and anchors at the target only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", type=float, default=0.1, help="keep ratio (default 0.1)")
    ap.add_argument("--sjlt-s", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10, help="best of N for read and sjlt")
    ap.add_argument("--slow-repeats", type=int, default=3,
                    help="best of N for gaussian and the anchors at the target config (1 elsewhere)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip slow runs estimated above this")
    ap.add_argument("--max-input-gb", type=float, default=3.3, help="largest [B, d] float32 gradient to allocate")
    ap.add_argument("--no-trak", dest="trak", action="store_false")
    ap.add_argument("--gap-seeds", type=int, default=16, help="seeds for the precision gap (SE ~1.2 pts at 16)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    args.budget_s = args.budget_s or 30.0
    meter = Meter(device)
    t_start = time.perf_counter()
    dims = [4_000_000] if args.quick else [1_000_000, 4_000_000, 16_000_000, 100_000_000]
    grid = [(d, k, b) for d in dims for k in (4096, 32768) for b in (1, 8, 32)]
    grid.sort(key=lambda c: c != TARGET)  # the target first: it calibrates the skip estimates
    calib: dict = {}
    configs = []
    for d, k, b in grid:
        if b * d * 4 / 1e9 > args.max_input_gb:
            configs.append({"d": d, "k": k, "B": b, "skipped": f"input {b * d * 4 / 1e9:.1f} GB > --max-input-gb"})
            continue
        configs.append(measure_config(d, k, b, args, meter, calib, device))
    gap = precision_gap(4096, args.gap_seeds)
    target = next(c for c in configs if (c["d"], c["k"], c["B"]) == TARGET)["backends"]
    t = {name: v.get("seconds") for name, v in target.items()}
    trak = target.get("trak_basic", {})
    summary = {
        "benchmark": "projection",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "target_config": {"d": TARGET[0], "k": TARGET[1], "B": TARGET[2], "keep_ratio": args.keep,
                          "sjlt_s": args.sjlt_s},
        "sjlt_speedup_vs_dense": t["dense_anchor"] / t["sjlt"],
        "sjlt_fraction_of_read_bandwidth": t["read"] / t["sjlt"],
        "gaussian_speedup_vs_dense": t["dense_anchor"] / t["gaussian"],
        "rademacher_speedup_vs_dense": t["dense_anchor"] / t["rademacher"] if t.get("rademacher") else None,
        "sjlt_precision_gap_pts": gap["gap_pts"],
        "sjlt_precision_gap_se_pts": gap["gap_se_pts"],
        "read_gb_per_s": target["read"]["gb_per_s"],
        "sjlt_gb_per_s": target["sjlt"]["gb_per_s"],
        "gaussian_gb_per_s": target["gaussian"]["gb_per_s"],
        "dense_anchor_gb_per_s": target["dense_anchor"]["gb_per_s"],
        "trak_basic": ({"gb_per_s": trak["gb_per_s"], "sjlt_speedup": t["trak_basic"] / t["sjlt"],
                        "gaussian_speedup": t["trak_basic"] / t["gaussian"]} if "seconds" in trak
                       else {"absent": trak.get("absent", "not measured")}),
        "targets_met": {
            "sjlt_speedup_vs_dense>=200": t["dense_anchor"] / t["sjlt"] >= 200,
            "sjlt_fraction_of_read_bandwidth>=0.3": t["read"] / t["sjlt"] >= 0.3,
            "sjlt_precision_gap_pts<=2": gap["gap_pts"] <= 2,
            "gaussian_speedup_vs_dense>=2": t["dense_anchor"] / t["gaussian"] >= 2,
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    stem = "projection" + ("_quick" if args.quick else "") + ("" if device.type == "cpu" else f"_{device.type}")
    path = args.out / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"summary": summary, "precision": gap, "configs": configs}, indent=1))
    os.replace(tmp, path)
    summary["json"] = str(path)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
