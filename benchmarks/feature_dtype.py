"""Selection under feature stores of float32 / float16 / bfloat16 (``scoring.feature_dtype``).

CROPI selects the pool prompts whose projected POPI gradient has the highest cosine with the target
set's mean projected gradient. This measures how much storing the features in 16 bits moves that
selection: for each dtype the pool and target features are written to a real feature store of that
dtype and read back, the target direction (:func:`target_direction`, 100 target prompts) and the
cosine scores (:func:`cosine_scores`) are recomputed from the decoded features, and compared with
float32's:

* precision@10%: |top-10%(dtype) ∩ top-10%(float32)| / |top-10%| over the usable pool prompts;
* Spearman rank correlation of the scores over the usable pool prompts;
* max |Δcos|;
* bytes per row on disk (features, fp16's row scale, the status byte).

Features: the stores of a finished CPU default run (``--stores DIR``, default
``runs/tiny_cpu/features/stage0`` when it exists: ``pool`` and ``target-*``), or else real projected
POPI gradients computed here: the CPU default model (``cpu-default`` preset, 0.38M parameters, seeded
init) on the synthetic suite's prompts (pool: every family; target: the add3c val set), K = 8
responses per prompt made of the correct answer and corrupted answers (reward 1 / 0, a random number
of correct ones, so some prompts have all-equal rewards and are excluded), behaviour log-probs from the
model itself (θ = β), scored with ``score_pool`` through the CPU default's projector (SJLT, k = 8192,
keep 0.5).

    python benchmarks/feature_dtype.py              # ~1-3 minutes on the 2-core CPU box
    python benchmarks/feature_dtype.py --stores runs/tiny_cpu/features/stage0

Writes ``benchmarks/results/feature_dtype.json``; prints one JSON line (the summary per dtype).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_STORES = ROOT / "runs" / "tiny_cpu" / "features" / "stage0"
DTYPES = ("float32", "float16", "bfloat16")


# ---------------------------------------------------------------- features
def load_stores(stage_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(pool [N, k], pool usable, target [M, k], target usable, description)`` from a stage's stores."""
    from megatron_cropi.influence.feature_store import DONE, FeatureStore

    pool = FeatureStore.load(stage_dir / "pool")
    targets = sorted(p for p in stage_dir.glob("target-*") if (p / "header.json").exists())
    if not targets:
        raise FileNotFoundError(f"no target-* feature store under {stage_dir}")
    t = FeatureStore.load(targets[0])
    pf, tf = pool.matrix().astype(np.float32), t.matrix().astype(np.float32)
    pu = (pool.statuses() == DONE) & (np.abs(pf).sum(1) > 0)
    tu = (t.statuses() == DONE) & (np.abs(tf).sum(1) > 0)
    return pf, pu, tf, tu, f"feature stores of {stage_dir} (pool, {targets[0].name}; stored as {pool.header.dtype})"


def _records():
    try:
        from megatron_cropi.records import Response, RolloutGroup
    except ImportError:  # before the records module
        from megatron_cropi.rollout.types import Response, RolloutGroup
    return Response, RolloutGroup


def _groups(prompts, tokenizer, k: int, rng: random.Random):
    """K responses per prompt: the answer or a corrupted one (reward 1 / 0); log-probs filled later."""
    Response, RolloutGroup = _records()
    out = []
    for rec in prompts:
        correct = rng.randint(0, k)
        resps, rewards = [], []
        for j in range(k):
            ans = rec.answer
            if j >= correct:
                digits = list(ans) or ["0"]
                i = rng.randrange(len(digits))
                digits[i] = rng.choice([c for c in "0123456789" if c != digits[i]])
                if rng.random() < 0.3:
                    digits = digits[:-1] if len(digits) > 1 else digits + ["1"]
                ans = "".join(digits)
            ids = np.asarray(tokenizer.encode_answer(ans), dtype=np.int32)
            resps.append(Response(ids, np.zeros(len(ids), np.float32)))
            rewards.append(1.0 if ans == rec.answer else 0.0)
        order = rng.sample(range(k), k)
        out.append(RolloutGroup(rec, tuple(resps[i] for i in order), np.asarray([rewards[i] for i in order], np.float32)))
    return out


def _on_policy(groups_list, model, groups, k: int, seq: int):
    """The groups with behaviour log-probs = the model's own (θ = β)."""
    import dataclasses

    import torch

    from megatron_cropi.model.logprobs import vocab_parallel_logprobs
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.popi.batch import pack_microbatches

    Response, _ = _records()
    mask = causal_attention_mask(seq, groups.device)
    out = []
    for start in range(0, len(groups_list), 32):
        part = groups_list[start:start + 32]
        mb = pack_microbatches(part, list(range(len(part))), prompts_per_microbatch=len(part),
                               responses_per_prompt=k, seq_length=seq)[0]
        with torch.no_grad():
            lp = vocab_parallel_logprobs(model(input_ids=mb.tokens, position_ids=mb.position_ids,
                                               attention_mask=mask), mb.labels).float().numpy()
        for gi, g in enumerate(part):
            p = len(g.prompt.token_ids)
            resps = tuple(Response(r.token_ids, lp[gi * k + ri, p - 1:p - 1 + len(r.token_ids)].astype(np.float32))
                          for ri, r in enumerate(g.responses))
            out.append(dataclasses.replace(g, responses=resps))
    return out


def popi_features(*, per_family: int, val_size: int, k_proj: int, keep_ratio: float, seed: int, log=print):
    """Projected POPI gradients of the CPU default model (see the module docstring)."""
    import torch

    from megatron_cropi.data.synthetic import build_synthetic_sets
    from megatron_cropi.influence.feature_store import DONE, FeatureHeader, FeatureStore
    from megatron_cropi.influence.scorer import ScoringConfig, score_pool
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.popi.batch import sequence_length_for
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config
    from megatron_cropi.data.char_tokenizer import CharTokenizer

    torch.manual_seed(seed)
    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1, seed=seed)
    mcfg = tiny_model_config("cpu-default")
    model = build_tiny_model(mcfg, groups, seed=seed, std=0.05)
    nparams = sum(p.numel() for p in model.parameters())
    tok = CharTokenizer()
    sets = build_synthetic_sets(seed=seed, per_family=per_family, val_size=val_size, test_size=1, check_per_family=1,
                                target="add3c", tokenizer=tok)
    rng = random.Random(seed)
    K = 8
    pool, target = _groups(sets.pool, tok, K, rng), _groups(sets.val, tok, K, rng)
    seq = sequence_length_for(pool + target)
    pool, target = _on_policy(pool, model, groups, K, seq), _on_policy(target, model, groups, K, seq)
    projector = build_projector(kind="sjlt", k=k_proj, keep_ratio=keep_ratio, seed=0)
    cfg = ScoringConfig(prompts_per_microbatch=16, microbatches_per_call=4, seq_length=seq)
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, gl in (("pool", pool), ("target", target)):
            t0 = time.perf_counter()
            store = FeatureStore.open(Path(d) / name, FeatureHeader(
                num_rows=len(gl), k=projector.k, seed=0, projector="sjlt", param_set_hash="-", checkpoint_step=0,
                prompt_id_hash="-"))
            stats = score_pool(gl, store, model=model, groups=groups, projector=projector, cfg=cfg, temperature=1.0,
                               responses_per_prompt=K, progress=False)
            f = store.matrix().copy()
            usable = (store.statuses() == DONE) & (np.abs(f).sum(1) > 0)
            log(f"  {name}: {len(gl)} prompts, {stats.scored} scored, {stats.excluded} excluded, "
                f"{time.perf_counter() - t0:.1f} s")
            out += [f, usable]
    desc = (f"projected POPI gradients (SJLT k={k_proj}, keep {keep_ratio}) of the cpu-default model "
            f"({nparams} parameters, seeded init) on synthetic prompts with fabricated K=8 responses, θ = β")
    return (*out, desc)


# ---------------------------------------------------------------- the comparison
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / math.sqrt((ra @ ra) * (rb @ rb)))


def round_trip(features: np.ndarray, usable: np.ndarray, dtype: str, directory: Path) -> tuple[np.ndarray, int]:
    """``features`` written to a feature store of ``dtype`` and read back; bytes per row on disk."""
    from megatron_cropi.influence.feature_store import DONE, EXCLUDED, FeatureHeader, FeatureStore

    n, k = features.shape
    store = FeatureStore.open(directory, FeatureHeader(num_rows=n, k=k, seed=0, projector="-", param_set_hash="-",
                                                       checkpoint_step=0, prompt_id_hash="-", dtype=dtype))
    store.write_rows(np.arange(n), features, np.where(usable, DONE, EXCLUDED))
    back = FeatureStore.load(directory).matrix().copy()
    size = sum(p.stat().st_size for p in directory.iterdir() if p.name != "header.json")
    return back, size // n


def compare(pf, pu, tf, tu, *, frac: float = 0.1, max_target: int = 100, seed: int = 0) -> dict:
    from megatron_cropi.selection.scores import cosine_scores, target_direction, top_m

    rows = np.flatnonzero(pu)
    m = max(1, int(math.ceil(frac * rows.size)))
    ref = None
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for dtype in DTYPES:
            p, pbytes = round_trip(pf, pu, dtype, Path(d) / f"pool-{dtype}")
            t, _ = round_trip(tf, tu, dtype, Path(d) / f"target-{dtype}")
            direction, _ = target_direction(t, tu, max_prompts=max_target, seed=seed)
            s = cosine_scores(p, pu, direction)
            top = set(top_m(s, m).tolist())
            if ref is None:
                ref = (s, top)
            out[dtype] = {
                "precision_at_10": len(top & ref[1]) / m,
                "spearman": spearman(s[rows], ref[0][rows]),
                "max_abs_dcos": float(np.max(np.abs(s[rows] - ref[0][rows]))),
                "max_rel_feature_error": float(np.max(np.abs(p.astype(np.float64) - pf)
                                                      / np.maximum(np.abs(pf).max(1, keepdims=True), 1e-30))),
                "bytes_per_row": int(pbytes),
                "bytes_per_row_vs_float32": None,
            }
    for dtype in DTYPES:
        out[dtype]["bytes_per_row_vs_float32"] = out[dtype]["bytes_per_row"] / out["float32"]["bytes_per_row"]
    return {"pool_usable": int(rows.size), "top_m": m, "target_usable": int(tu.sum()), "per_dtype": out}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", type=Path, default=None,
                    help=f"a stage's feature-store directory (default {DEFAULT_STORES} when it exists)")
    ap.add_argument("--per-family", type=int, default=160, help="pool prompts per synthetic family (generated; CPU default 160)")
    ap.add_argument("--val-size", type=int, default=100, help="target prompts (generated)")
    ap.add_argument("--k", type=int, default=8192, help="projection dim (generated; CPU default 8192)")
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "feature_dtype.json")
    args = ap.parse_args(argv)
    torch_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        import torch

        torch.set_num_threads(torch_threads)
    except ImportError:
        pass
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    stores = args.stores or (DEFAULT_STORES if (DEFAULT_STORES / "pool" / "header.json").exists() else None)
    if stores is not None:
        pf, pu, tf, tu, desc = load_stores(stores)
        config = {"source": str(stores)}
    else:
        pf, pu, tf, tu, desc = popi_features(per_family=args.per_family, val_size=args.val_size, k_proj=args.k,
                                             keep_ratio=args.keep_ratio, seed=args.seed, log=log)
        config = {"source": "generated", "per_family": args.per_family, "val_size": args.val_size, "k": args.k,
                  "keep_ratio": args.keep_ratio, "seed": args.seed}
    result = compare(pf, pu, tf, tu, seed=args.seed)
    summary = {
        "benchmark": "feature_dtype",
        "features": desc,
        "config": {**config, "pool_rows": int(pf.shape[0]), "target_rows": int(tf.shape[0]), "k": int(pf.shape[1]),
                   "selection": "top 10% of cosine to the mean of <=100 target rows (target_direction seed 0)"},
        **result,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
