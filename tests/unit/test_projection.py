"""Laws of every projector backend: the dense oracle, linearity, determinism, layout invariance,
JL norm / inner-product bounds, every kept coordinate contributes, low-precision inputs."""

import math

import pytest
import torch

from megatron_cropi.projection import (
    DenseProjector,
    GaussianProjector,
    RademacherProjector,
    ShardSpec,
    SJLTProjector,
)
from megatron_cropi.projection import shards as shards_mod

FAST = {
    "gaussian": lambda **kw: GaussianProjector(**kw),
    "rademacher": lambda **kw: RademacherProjector(**kw),
    "sjlt1": lambda **kw: SJLTProjector(s=1, **kw),
    "sjlt4": lambda **kw: SJLTProjector(s=4, **kw),
}
ORACLE = {
    "gaussian": dict(operator="gaussian"),
    "rademacher": dict(operator="rademacher"),
    "sjlt1": dict(operator="sjlt", s=1),
    "sjlt4": dict(operator="sjlt", s=4),
}
KINDS = list(FAST)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_fast_backend_equals_dense_oracle(kind, keep):
    x = torch.randn(3, 12, 20, generator=_gen())
    spec = ShardSpec.whole("decoder.layers.0.mlp.linear_fc2.weight", (12, 20))
    fast = FAST[kind](k=64, keep_ratio=keep, seed=5)
    dense = DenseProjector(k=64, keep_ratio=keep, seed=5, **ORACLE[kind])
    assert _rel(fast.project(x, spec), dense.project(x, spec)) < 1e-5
    # the oracle's matrix columns are the projections of the unit vectors
    mat = dense.matrix(spec.global_name, spec.global_shape)
    eye = torch.eye(240).reshape(240, 12, 20)
    assert _rel(fast.project(eye, spec).t(), mat) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_linearity_and_determinism_across_fresh_instances(kind):
    spec = ShardSpec.whole("w", (40, 30))
    x, y = torch.randn(2, 4, 40, 30, generator=_gen(1))
    p = FAST[kind](k=128, keep_ratio=0.5, seed=11)
    lhs = p.project(2.5 * x - 0.75 * y, spec)
    rhs = 2.5 * p.project(x, spec) - 0.75 * p.project(y, spec)
    assert _rel(lhs, rhs) < 1e-5
    again = FAST[kind](k=128, keep_ratio=0.5, seed=11).project(x, spec)
    assert torch.equal(p.project(x, spec), again)  # bit-identical from a fresh instance
    assert not torch.allclose(FAST[kind](k=128, keep_ratio=0.5, seed=12).project(x, spec), again)
    assert not torch.allclose(p.project(x, ShardSpec.whole("other", (40, 30))), again)
    # batch-size invariance: rows projected alone equal the batched projection
    rows = torch.cat([p.project(x[i : i + 1], spec) for i in range(4)])
    assert _rel(rows, again) < 1e-6


def _blocks(shape, dim, parts):
    step = shape[dim] // parts
    for i in range(parts):
        off = [0] * len(shape)
        shp = list(shape)
        off[dim], shp[dim] = i * step, step
        yield tuple(off), tuple(shp)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [1.0, 0.2])
def test_layout_invariance_over_splits_along_either_dim(kind, keep):
    shape = (16, 24)
    x = torch.randn(3, *shape, generator=_gen(2))
    p = FAST[kind](k=96, keep_ratio=keep, seed=3)
    ref = p.project(x, ShardSpec.whole("w", shape))
    for dim in (0, 1):
        for parts in (1, 2, 4):
            total = torch.zeros_like(ref)
            for off, shp in _blocks(shape, dim, parts):
                spec = ShardSpec("w", shape, off, shp)
                fresh = FAST[kind](k=96, keep_ratio=keep, seed=3)
                total += fresh.project(x[(slice(None),) + spec.global_slices()], spec)
            assert _rel(total, ref) < 1e-5, (dim, parts)
    # a SwiGLU fc1 TP shard is two blocks ([gate_r; up_r]); a 2x2 grid of tiles; project_many
    items = []
    for r in range(2):
        for part in range(2):
            spec = ShardSpec("w", shape, (part * 8 + r * 4, 0), (4, 24))
            items.append((x[(slice(None),) + spec.global_slices()], spec))
    assert _rel(p.project_many(items), ref) < 1e-5
    tiles = [ShardSpec("w", shape, (a, b), (8, 12)) for a in (0, 8) for b in (0, 12)]
    assert _rel(sum(p.project(x[(slice(None),) + t.global_slices()], t) for t in tiles), ref) < 1e-5


@pytest.mark.parametrize("kind", ["gaussian", "sjlt1"])
def test_layout_invariance_for_3d_and_1d_and_chunked_index_builds(kind, monkeypatch):
    x3 = torch.randn(2, 6, 8, 10, generator=_gen(4))
    p = FAST[kind](k=64, keep_ratio=0.4, seed=9)
    ref = p.project(x3, ShardSpec.whole("t", (6, 8, 10)))
    total = sum(p.project(x3[:, :, i * 2 : (i + 1) * 2], ShardSpec("t", (6, 8, 10), (0, i * 2, 0), (6, 2, 10)))
                for i in range(4))
    assert _rel(total, ref) < 1e-5
    x1 = torch.randn(2, 100, generator=_gen(5))
    ref1 = p.project(x1, ShardSpec.whole("bias", (100,)))
    total1 = sum(p.project(x1[:, i * 25 : (i + 1) * 25], ShardSpec("bias", (100,), (i * 25,), (25,)))
                 for i in range(4))
    assert _rel(total1, ref1) < 1e-5
    # building the index data in tiny tiles (chunk size) changes nothing
    monkeypatch.setattr(shards_mod, "DEFAULT_TILE_ELEMS", 7)
    monkeypatch.setattr(shards_mod.kept_local_indices, "__defaults__", ("cpu", 7))
    fresh = FAST[kind](k=64, keep_ratio=0.4, seed=9)
    assert torch.equal(fresh.project(x3, ShardSpec.whole("t", (6, 8, 10))), ref)


def _jl_failure_bound(k, eps):
    """P(|‖Px‖²/‖x‖² - 1| > eps) for Gaussian or Rademacher P/√k (Achlioptas 2003, Thm 1.1 proof)."""
    return 2 * math.exp(-k * (eps**2 / 2 - eps**3 / 3) / 2)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_jl_norm_and_inner_product_tail_bounds(kind):
    k, d, n, eps = 2048, 3000, 24, 0.25
    delta = 3 * n * _jl_failure_bound(k, eps)  # union over n vectors and their sums/differences
    assert delta < 1e-5  # the test fails for a correct operator with probability < 1e-5 over seeds
    x = torch.randn(n, d, generator=_gen(6)).double()
    x = x / x.norm(dim=1, keepdim=True)
    p = FAST[kind](k=k, keep_ratio=1.0, seed=21)
    spec = ShardSpec.whole("w", (d,))
    px = p.project(x.float(), spec).double()
    ratio = px.square().sum(1)
    assert (ratio - 1).abs().max() < eps
    # inner products of unit vectors: |<Px,Py> - <x,y>| <= eps (polarisation of the norm bound)
    y = torch.roll(x, 1, 0) * 0.6 + x * 0.8  # correlated pairs
    y = y / y.norm(dim=1, keepdim=True)
    py = p.project(y.float(), spec).double()
    err = (px * py).sum(1) - (x * y).sum(1)
    assert err.abs().max() < eps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_norm_moments_match_jl_theory(kind, keep):
    """E‖Px‖² = ‖x_kept‖² and Var ≤ (2/k)‖x_kept‖⁴ for every backend (for SJLT the exact variance is
    (2/k)(‖x‖⁴ - ‖x‖₄⁴)); the test allows 2x the variance bound over 64 vectors (χ²_64/64 > 2 has
    probability ~1e-5) and 5 standard errors on the mean."""
    k, d, n = 256, 2000, 64
    p = FAST[kind](k=k, keep_ratio=keep, seed=31)
    spec = ShardSpec.whole("w", (d,))
    x = torch.randn(n, d, generator=_gen(7))
    kept = DenseProjector(k=1, keep_ratio=keep, seed=31, operator="sjlt").matrix("w", (d,)).ne(0).squeeze(0)
    xk2 = x[:, kept].double().square().sum(1)
    ratio = p.project(x, spec).double().square().sum(1) / xk2
    var_bound = 2 / k
    assert abs(ratio.mean().item() - 1) < 5 * math.sqrt(var_bound / n)
    assert ((ratio - 1) ** 2).mean().item() < 2 * var_bound
    assert abs(kept.float().mean().item() - keep) < 5 * math.sqrt(keep * (1 - keep) / d) + 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_every_kept_coordinate_contributes(kind):
    shape = (7, 9)
    d = 63
    spec = ShardSpec.whole("w", shape)
    eye = torch.eye(d).reshape(d, *shape)
    full = FAST[kind](k=32, keep_ratio=1.0, seed=1).project(eye, spec)
    assert full.abs().sum(1).min() > 0  # first, last and every single-non-zero input
    if kind.startswith("sjlt"):  # s entries of ±1/√s in distinct slots: unit columns exactly
        assert torch.allclose(full.norm(dim=1), torch.ones(d), atol=1e-6)
    p = FAST[kind](k=32, keep_ratio=0.3, seed=1)
    cols = p.project(eye, spec)
    kept = cols.abs().sum(1) > 0
    dense = DenseProjector(k=32, keep_ratio=0.3, seed=1, **ORACLE[kind])
    assert torch.equal(kept, dense.matrix("w", shape).abs().sum(0) > 0)
    assert 0 < kept.sum() < d
    # a shard holding only the last row still sees its kept coordinates
    last = ShardSpec("w", shape, (6, 0), (1, 9))
    got = p.project(eye[-9:, 6:7, :], last)
    assert torch.equal(got.abs().sum(1) > 0, kept[-9:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(kind, dtype):
    spec = ShardSpec.whole("w", (50, 40))
    x = (torch.randn(3, 50, 40, generator=_gen(8)) * 1e-3).to(dtype)
    p = FAST[kind](k=64, keep_ratio=0.5, seed=2)
    out = p.project(x, spec)
    assert out.dtype == torch.float32
    assert _rel(out, p.project(x.float(), spec)) < 1e-6


def test_index_cache_is_reused_and_optional():
    spec = ShardSpec.whole("w", (100, 50))
    x = torch.randn(2, 100, 50, generator=_gen(9))
    p = SJLTProjector(k=64, keep_ratio=0.1, seed=0, s=2)
    ref = p.project(x, spec)
    nbytes = p.cache_nbytes()
    m = (p.index_data(spec)[1].shape[1])
    assert nbytes == m * (4 + 2 * (4 + 1))  # int32 index + s × (int32 slot + int8 sign)
    p.project(x, spec)
    assert p.cache_nbytes() == nbytes
    nocache = SJLTProjector(k=64, keep_ratio=0.1, seed=0, s=2, cache_index=False)
    assert torch.equal(nocache.project(x, spec), ref) and nocache.cache_nbytes() == 0
    g = GaussianProjector(k=64, keep_ratio=1.0)
    g.project(x, spec)
    assert g.cache_nbytes() == 100 * 50 * 4  # keep_ratio 1: column keys only, no index


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_chunked_gather_and_blocked_generation_change_nothing(kind, keep, monkeypatch):
    """Large shards are gathered in chunks and the Gaussian matrix generated in blocks: force many
    small (and ragged) chunks and blocks and compare with the dense oracle."""
    from megatron_cropi.projection import gaussian as gaussian_mod
    from megatron_cropi.projection import sjlt as sjlt_mod

    monkeypatch.setattr(sjlt_mod, "GATHER_CHUNK", 7)
    monkeypatch.setattr(gaussian_mod, "GATHER_CHUNK", 10)
    x = torch.randn(3, 12, 20, generator=_gen(10))
    spec = ShardSpec("w", (24, 20), (12, 0), (12, 20))
    kw = {"block_size": 3} if kind in ("gaussian", "rademacher") else {}
    fast = FAST[kind](k=40, keep_ratio=keep, seed=6, **kw)
    dense = DenseProjector(k=40, keep_ratio=keep, seed=6, **ORACLE[kind])
    assert _rel(fast.project(x, spec), dense.project(x, spec)) < 1e-5
    assert _rel(fast.project(x.bfloat16(), spec), dense.project(x.bfloat16(), spec)) < 1e-5
