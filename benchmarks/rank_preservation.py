"""Rank preservation of projected cosines: the paper's precision@10% vs sparse-ratio figure.

For a pool of per-prompt gradients ``g_i`` and a target set T, the exact score of prompt i is
``cos(g_i, mean_{t∈T} g_t)``; the projected score is ``cos(P g_i, mean_t P g_t)``.
precision@10% = |top-10%(projected) ∩ top-10%(exact)| / |top-10%| (random ranking: 10%).
It is measured for every backend × keep ratio {1, .5, .3, .2, .15, .1, .05, .01, .001} × seeds, and
plotted beside the paper's published points (pixel readings of its precision-vs-sparse-ratio figures).

Gradients: until the POPI capture lands, per-sample LM gradients of a small Megatron GPT built with
``megatron_cropi.testing.tiny`` (TP=1, one process, one backward per sequence). The pool mixes
sequences from 4 random Markov sources; each source also has a held-out target set whose mean
gradient is a target, so each target's top 10% is a fine-grained choice among its own source's
sequences (precision is averaged over the 4 targets). To use other gradients (POPI) call
:func:`rank_preservation` with an ``[N, d]`` matrix (or ``{name: [N, *shape]}``) and the target rows.

    python benchmarks/rank_preservation.py --quick     # < 3 minutes on the 2-core CPU box
    python benchmarks/rank_preservation.py             # the full study (~10 minutes)

Writes ``benchmarks/results/rank_preservation[_quick].{json,png}``; the last line printed is a JSON
summary (precision@10% per backend at keep 0.1, sjlt − gaussian gap in points, paths).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
KEEP_RATIOS = (1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.05, 0.01, 0.001)
BACKENDS = {  # name -> ProjectionConfig overrides
    "gaussian": dict(kind="gaussian"),
    "rademacher": dict(kind="rademacher"),
    "sjlt": dict(kind="sjlt", sjlt_s=1),
    "sjlt_s4": dict(kind="sjlt", sjlt_s=4),
}
# pixel readings (±1 point) of the paper's precision@10% vs sparse-ratio figures, 1.5B and 3B (in %)
PAPER_POINTS = {
    "CROPI 1.5B": {1.0: 13.4, 0.9: 16.0, 0.5: 22.5, 0.3: 39.4, 0.2: 67.6, 0.15: 76.5, 0.12: 72.6, 0.1: 69.6,
                   0.09: 68.8, 0.08: 66.4, 0.05: 67.1, 0.03: 62.9, 0.01: 51.4, 1e-3: 33.9, 1e-4: 17.5, 1e-5: 15.7},
    "CROPI 3B": {1.0: 14.5, 0.9: 14.1, 0.5: 17.2, 0.3: 40.0, 0.2: 67.2, 0.15: 82.0, 0.12: 80.4, 0.1: 78.9,
                 0.09: 78.5, 0.08: 77.7, 0.05: 73.5, 0.03: 68.8, 1e-3: 41.4, 1e-4: 39.7, 1e-5: 35.6},
}
SIZES = {  # name -> (tiny_model_config kwargs, pool size, rows per target set, sequence length)
    "quick": (dict(vocab_size=256, hidden_size=128, ffn_hidden_size=256, num_layers=2), 400, 16, 32),
    "full": (dict(vocab_size=512, hidden_size=128, ffn_hidden_size=384, num_layers=3), 800, 32, 32),
}


# ---------------------------------------------------------------- the metric (gradient-agnostic)
def _as_items(grads) -> list[tuple[torch.Tensor, "ShardSpec"]]:
    from megatron_cropi.projection import ShardSpec

    if isinstance(grads, torch.Tensor):
        return [(grads, ShardSpec.whole("flat", tuple(grads.shape[1:])))]
    return [(g, ShardSpec.whole(name, tuple(g.shape[1:]))) for name, g in grads.items()]


def _pool_rows(n: int, target_sets) -> torch.Tensor:
    in_target = {int(i) for rows in target_sets for i in rows}
    return torch.tensor([i for i in range(n) if i not in in_target], dtype=torch.long)


def exact_scores(grads, target_sets: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos of every pool row with each target set's mean gradient [T, pool], pool row indices)``.

    Computed in float64 over all parameters; the pool is every row not in a target set.
    """
    items = _as_items(grads)
    n = items[0][0].shape[0]
    pool = _pool_rows(n, target_sets)
    dot = torch.zeros(len(target_sets), n, dtype=torch.float64)
    sq = torch.zeros(n, dtype=torch.float64)
    tsq = torch.zeros(len(target_sets), dtype=torch.float64)
    for g, _ in items:
        flat = g.reshape(n, -1).double()
        t = torch.stack([flat[torch.as_tensor(list(rows))].mean(0) for rows in target_sets])
        dot += t @ flat.t()
        sq += flat.square().sum(1)
        tsq += t.square().sum(1)
    cos = dot / (sq.sqrt().unsqueeze(0) * tsq.sqrt().unsqueeze(1)).clamp_min(1e-300)
    return cos[:, pool], pool


def projected_scores(features: torch.Tensor, target_sets, pool: torch.Tensor) -> torch.Tensor:
    """``cos(P g_i, mean_{t∈T} P g_t)`` ``[T, pool]`` from ``features [N, k]``."""
    f = features.double()
    t = torch.stack([f[torch.as_tensor(list(rows))].mean(0) for rows in target_sets])
    fn = torch.nn.functional.normalize(f[pool], dim=1)
    return torch.nn.functional.normalize(t, dim=1) @ fn.t()


def precision_at(projected: torch.Tensor, exact: torch.Tensor, frac: float = 0.1) -> float:
    """|top-frac(projected) ∩ top-frac(exact)| / |top-frac|, averaged over target sets (rows)."""
    projected, exact = projected.reshape(-1, projected.shape[-1]), exact.reshape(-1, exact.shape[-1])
    n_top = max(1, int(round(frac * exact.shape[1])))
    hits = []
    for p_row, e_row in zip(projected, exact):
        a = set(torch.topk(p_row, n_top).indices.tolist())
        b = set(torch.topk(e_row, n_top).indices.tolist())
        hits.append(len(a & b) / n_top)
    return float(np.mean(hits))


def rank_preservation(grads, target_sets: Sequence[Sequence[int]], *, k: int, keep_ratios=KEEP_RATIOS,
                      seeds=(0, 1, 2), backends: Mapping[str, dict] = BACKENDS, frac: float = 0.1,
                      log=print) -> dict:
    """precision@frac of every backend × keep ratio × seed on one gradient set.

    Args:
        grads: ``[N, d]`` per-prompt gradients, or ``{parameter name: [N, *shape]}`` (e.g. POPI
            gradients by global parameter name).
        target_sets: one or more lists of rows; each set's mean gradient is a target, and every row
            outside all sets is in the ranked pool. precision is averaged over the target sets.
        k: projection dimension.

    Returns:
        ``{backend: {str(keep): {"precision": [per seed], "mean", "std", "seconds_per_seed"}}}``.
    """
    from megatron_cropi.projection import ProjectionConfig, build_projector

    if target_sets and isinstance(next(iter(target_sets)), (int, np.integer)):
        target_sets = [list(target_sets)]  # a single set given as a flat list of rows
    exact, pool = exact_scores(grads, target_sets)
    items = _as_items(grads)
    out: dict = {}
    for name, overrides in backends.items():
        out[name] = {}
        for q in keep_ratios:
            precs, t0 = [], time.perf_counter()
            for seed in seeds:
                proj = build_projector(ProjectionConfig(k=k, keep_ratio=q, seed=seed, **overrides))
                feats = proj.project_many(items)
                precs.append(precision_at(projected_scores(feats, target_sets, pool), exact, frac))
            dt = (time.perf_counter() - t0) / len(seeds)
            out[name][str(q)] = {"precision": precs, "mean": float(np.mean(precs)), "std": float(np.std(precs)),
                                 "seconds_per_seed": dt}
            log(f"  {name:>10s} keep={q:<6g} precision@{frac:.0%} = {np.mean(precs):.3f} ± {np.std(precs):.3f}"
                f"  ({dt:.1f} s/seed)")
    return out


# ---------------------------------------------------------------- gradients of a small Megatron GPT
def _markov_sources(num: int, vocab: int, seed: int, branching: int = 8) -> list[np.ndarray]:
    """``num`` random sparse transition matrices ``[vocab, vocab]`` (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(num):
        m = np.zeros((vocab, vocab))
        for a in range(vocab):
            nxt = rng.choice(vocab, branching, replace=False)
            m[a, nxt] = rng.dirichlet(np.ones(branching))
        mats.append(m)
    return mats


def _sample(mat: np.ndarray, n: int, length: int, rng) -> np.ndarray:
    vocab = mat.shape[0]
    out = np.zeros((n, length + 1), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab, n)
    cum = mat.cumsum(1)
    for t in range(length):
        u = rng.random(n)
        out[:, t + 1] = np.minimum((cum[out[:, t]] < u[:, None]).sum(1), vocab - 1)
    return out


def lm_gradients(size: str = "quick", *, seed: int = 0, warmup_steps: int = 30, num_sources: int = 4, log=print):
    """Per-sequence LM gradients of a small Megatron GPT: ``({global name: [N, *shape]}, target_sets)``.

    Sequences come from ``num_sources`` random Markov chains: per source a held-out target set and a
    share of the pool, so each target's top 10% is a fine-grained choice within its own source.

    The model is briefly trained on the mixture first (Adam, ``warmup_steps``), so the gradients are
    those of a model that has seen the data rather than of a random initialisation.
    """
    from megatron_cropi.model.schedule import causal_attention_mask, forward_backward
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    arch, n_pool, n_target, seq = SIZES[size]
    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    cfg = tiny_model_config(
        "custom", vocab_size=arch["vocab_size"], max_sequence_length=seq, tie_word_embeddings=False,
        rotary_base=10000.0, transformer=dict(num_layers=arch["num_layers"], hidden_size=arch["hidden_size"],
                                              ffn_hidden_size=arch["ffn_hidden_size"], num_attention_heads=4,
                                              num_query_groups=2))
    model = build_tiny_model(cfg, groups, seed=seed, std=0.02)
    rng = np.random.default_rng(seed + 1)
    sources = _markov_sources(num_sources, cfg.vocab_size, seed)
    per_source = n_pool // num_sources
    seqs = [_sample(m, n_target, seq, rng) for m in sources] + [_sample(m, per_source, seq, rng) for m in sources]
    data = torch.from_numpy(np.concatenate(seqs))
    target_sets = [list(range(c * n_target, (c + 1) * n_target)) for c in range(num_sources)]
    mask = causal_attention_mask(seq, groups.device)
    pos = torch.arange(seq, device=groups.device).unsqueeze(0)

    def run(batch_tokens):
        b = batch_tokens.shape[0]

        def step(it, model):
            toks = next(it).to(groups.device)
            out = model(input_ids=toks[:, :-1], position_ids=pos.expand(b, seq), attention_mask=mask,
                        labels=toks[:, 1:])
            return out, lambda t: (t.float().mean(), {})

        forward_backward(model, groups, forward_step_func=step, data_iterator=iter([batch_tokens]),
                         num_microbatches=1, seq_length=seq, micro_batch_size=b)

    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    mix = [_sample(sources[i % num_sources], 1, seq, rng) for i in range(16 * num_sources)]
    mix = torch.from_numpy(np.concatenate(mix))
    for _ in range(warmup_steps):
        opt.zero_grad(set_to_none=True)
        run(mix[torch.from_numpy(rng.choice(len(mix), 16, replace=False))])
        opt.step()
    params = dict(model.named_parameters())
    grads = {n: torch.empty(len(data), *p.shape) for n, p in params.items()}
    for i in range(len(data)):
        for p in params.values():
            p.grad = None
        run(data[i : i + 1])
        for n, p in params.items():
            grads[n][i] = p.grad
    d = sum(p.numel() for p in params.values())
    log(f"gradients: {len(data)} sequences x {d:,} parameters ({time.perf_counter() - t0:.1f} s)")
    return grads, target_sets


# ---------------------------------------------------------------- outputs
def popi_gradients(run_dir: Path, *, log=print):
    """Exact per-prompt POPI gradients at β of a finished ``cropi run`` (TP = PP = 1, e.g. the CPU default).

    Loads β (``warmup/hf`` or ``rollout.checkpoint``), the pool and target trajectory stores, and captures
    every prompt with a gradient through :class:`~megatron_cropi.popi.capture.PopiCapture` with the exact
    (identity) projector.

    Returns:
        ``(grads [N, d] float32, [target rows])``: pool rows first, then the target set's rows.
    """
    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.run_config import RunConfig
    from megatron_cropi.wiring import build_policy_model
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.popi.batch import pack_microbatches, sequence_length_for
    from megatron_cropi.popi.capture import PopiCapture, select_layouts
    from megatron_cropi.projection.exact import ExactProjector
    from megatron_cropi.rollout.store import TrajectoryStore

    state = json.loads((run_dir / "state.json").read_text())
    cfg = from_dict(RunConfig, state["config"])
    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1, seed=cfg.run.seed)
    hf = run_dir / "warmup" / "hf" if (run_dir / "warmup" / "hf").exists() else cfg.rollout.checkpoint
    model = build_policy_model(cfg, groups, hf_dir=hf)
    projector = ExactProjector.for_layouts(select_layouts(model, groups).values(), groups)
    sets = {"pool": run_dir / "rollouts" / "pool"}
    sets.update({p.name: p for p in sorted((run_dir / "rollouts").glob("target-*"))})
    rows, chunks, sizes = [], [], {}
    for name, path in sets.items():
        store = TrajectoryStore.open(path)
        live = [g for g in store.iter_groups() if not g.zero_variance]
        sp = store.header.sampling_params
        temp = sp.temperature if sp.logprobs == "sampling" and sp.temperature > 0 else 1.0
        cap = PopiCapture(model, groups, projector, mode="batched", temperature=temp)
        seq = sequence_length_for(live)
        for start in range(0, len(live), 64):
            part = live[start:start + 64]
            mbs = pack_microbatches(part, list(range(len(part))), prompts_per_microbatch=8, responses_per_prompt=sp.n,
                                    seq_length=seq)
            chunks.append(cap.run(mbs, len(part), sp.n).sketches)
        sizes[name] = len(live)
        log(f"  POPI gradients of {name}: {len(live)} prompts with a gradient, d = {projector.k}")
    grads = torch.cat(chunks)
    n_pool = sizes["pool"]
    start = n_pool
    target_sets = []
    for name in list(sets)[1:]:
        target_sets.append(list(range(start, start + sizes[name])))
        start += sizes[name]
    return grads, target_sets


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, series in results.items():
        qs = sorted(float(q) for q in series)
        mean = np.array([series[str(q)]["mean"] for q in qs]) * 100
        std = np.array([series[str(q)]["std"] for q in qs]) * 100
        ax.plot(qs, mean, marker="o", label=f"ours: {name}")
        ax.fill_between(qs, mean - std, mean + std, alpha=0.15)
    for (name, pts), style in zip(PAPER_POINTS.items(), ("s--", "^--")):
        qs = sorted(pts)
        ax.plot(qs, [pts[q] for q in qs], style, color="gray" if "1.5B" in name else "black", alpha=0.7,
                label=f"paper: {name} (fp16 TRAK, k=32768)")
    ax.axhline(10, color="red", ls=":", label="random (10%)")
    ax.set_xscale("log")
    ax.set_xlabel("sparse ratio (fraction of coordinates kept)")
    ax.set_ylabel("precision@10% (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and k (< 3 minutes)")
    ap.add_argument("--k", type=int, default=None, help="projection dim (default 512 quick, 1024 full)")
    ap.add_argument("--seeds", type=int, default=None, help="projection seeds (default 3 quick, 5 full)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--popi", type=Path, default=None,
                    help="a finished cropi run directory: use its exact POPI gradients at β instead of LM gradients")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    size = "quick" if args.quick else "full"
    k = args.k or (512 if args.quick else 1024)
    args.seeds = args.seeds or (3 if args.quick else 5)
    t0 = time.perf_counter()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731 - stdout keeps the JSON line last
    if args.popi:
        grads, target_sets = popi_gradients(args.popi, log=log)
        kind = f"exact POPI gradients at β of {args.popi.name} (cpu-default model, synthetic suite)"
    else:
        grads, target_sets = lm_gradients(size, log=log)
        kind = "per-sequence LM gradients, tiny Megatron GPT"
    results = rank_preservation(grads, target_sets, k=k, seeds=tuple(range(args.seeds)), log=log)
    n = grads.shape[0] if isinstance(grads, torch.Tensor) else next(iter(grads.values())).shape[0]
    n_target = sum(len(t) for t in target_sets)
    d = grads.shape[1] if isinstance(grads, torch.Tensor) else sum(g[0].numel() for g in grads.values())
    stem = "rank_preservation" + ("_popi" if args.popi else "") + ("_quick" if args.quick else "")
    report = {
        "benchmark": "rank_preservation",
        "config": {"size": size, "k": k, "seeds": args.seeds, "num_sequences": n, "pool": n - n_target,
                   "target_sets": len(target_sets), "rows_per_target": len(target_sets[0]), "num_parameters": d,
                   "keep_ratios": list(KEEP_RATIOS),
                   "backends": BACKENDS, "gradients": kind},
        "results": results,
        "paper_points": {name: {str(q): v for q, v in pts.items()} for name, pts in PAPER_POINTS.items()},
        "seconds": time.perf_counter() - t0,
    }
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    _atomic_write(json_path, json.dumps(report, indent=1).encode())
    plot(results, png_path, f"precision@10% vs sparse ratio: {d:,}-parameter GPT, {n - n_target} prompts, "
                            f"k={k}, {args.seeds} seeds")
    at = {name: results[name]["0.1"]["mean"] for name in results}
    summary = {
        "benchmark": "rank_preservation",
        "k": k,
        "num_parameters": d,
        "precision_at_keep_0.1": at,
        "precision_at_keep_1": {name: results[name]["1.0"]["mean"] for name in results},
        "sjlt_precision_gap_pts": 100 * (at["gaussian"] - at["sjlt"]),
        "sjlt_precision_gap_se_pts": 100 * math.sqrt(
            (results["gaussian"]["0.1"]["std"] ** 2 + results["sjlt"]["0.1"]["std"] ** 2) / max(1, args.seeds - 1)),
        "json": str(json_path),
        "png": str(png_path),
        "seconds": round(report["seconds"], 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
