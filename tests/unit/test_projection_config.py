"""Bad input gets a clear error; ProjectionConfig and the registry; which pieces a rank projects."""

from types import SimpleNamespace

import pytest
import torch

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.projection import (
    DenseProjector,
    GaussianProjector,
    ProjectionConfig,
    ProjectionInputError,
    Projector,
    RademacherProjector,
    ShardSpec,
    SJLTProjector,
    build_projector,
    projection_pieces,
    project_local_gradients,
    projector_kinds,
    register_projector,
)

BACKENDS = [GaussianProjector, RademacherProjector, SJLTProjector, DenseProjector]


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_k_must_be_positive_int(cls, k):
    with pytest.raises(ProjectionInputError, match="projection dimension k must be an int > 0"):
        cls(k=k)


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan"), "half", 1e-12])
def test_keep_ratio_must_be_in_unit_interval(cls, q):
    with pytest.raises(ProjectionInputError, match="keep_ratio"):
        cls(k=8, keep_ratio=q)


def test_slice_outside_global_shape_is_rejected_by_name():
    with pytest.raises(ValueError,
                       match=r"fc1.weight: block \[6:10\) of dim 0 lies outside the global shape \(8, 4\)"):
        ShardSpec("fc1.weight", (8, 4), (6, 0), (4, 4))
    forged = ShardSpec.whole("fc1.weight", (8, 4))
    object.__setattr__(forged, "offset", (0, 2))  # bypasses __post_init__
    with pytest.raises(ProjectionInputError, match=r"fc1.weight: slice \[2:6\) of dim 1 lies outside"):
        SJLTProjector(k=8).project(torch.zeros(1, 8, 4), forged)


@pytest.mark.parametrize("cls", BACKENDS)
def test_shard_must_match_spec_and_be_floating_point(cls):
    p = cls(k=8)
    spec = ShardSpec("w", (8, 6), (4, 0), (4, 6))
    with pytest.raises(ProjectionInputError,
                       match=r"w: shard of shape \(2, 6, 4\) does not match \[B, \*spec.shape\] = \[B, 4, 6\]"):
        p.project(torch.zeros(2, 6, 4), spec)
    with pytest.raises(ProjectionInputError, match="w: gradient must be a floating-point tensor"):
        p.project(torch.zeros(2, 4, 6, dtype=torch.int64), spec)
    with pytest.raises(ProjectionInputError, match="expected a torch.Tensor"):
        p.project([[0.0]], spec)


def test_project_many_rejects_mixed_dtypes_batches_and_empty_calls():
    p = SJLTProjector(k=8)
    a, b = ShardSpec.whole("a", (3,)), ShardSpec.whole("b", (2,))
    with pytest.raises(ProjectionInputError,
                       match="mismatched dtypes in one call: a is torch.float32, b is torch.bfloat16"):
        p.project_many([(torch.zeros(2, 3), a), (torch.zeros(2, 2, dtype=torch.bfloat16), b)])
    with pytest.raises(ProjectionInputError, match="mismatched batch sizes"):
        p.project_many([(torch.zeros(2, 3), a), (torch.zeros(3, 2), b)])
    with pytest.raises(ProjectionInputError, match="at least one"):
        p.project_many([])
    x, y = torch.randn(2, 3), torch.randn(2, 2)
    assert torch.allclose(p.project_many([(x, a), (y, b)]), p.project(x, a) + p.project(y, b))


def test_backend_specific_arguments_are_checked():
    with pytest.raises(ProjectionInputError, match=r"sjlt s \(non-zeros per coordinate\) must be an int in \[1, k=4\]"):
        SJLTProjector(k=4, s=5)
    with pytest.raises(ProjectionInputError, match="block_size must be an int >= 0"):
        GaussianProjector(k=4, block_size=-1)
    with pytest.raises(ProjectionInputError, match="seed must be an int >= 0"):
        GaussianProjector(k=4, seed=-1)
    with pytest.raises(ProjectionInputError, match="dense operator must be one of"):
        DenseProjector(k=4, operator="fft")
    big = DenseProjector(k=1024, max_entries=1 << 20)
    with pytest.raises(ProjectionInputError,
                       match=r"embedding: the dense oracle would materialise a 1024 x 2048 matrix"):
        big.project(torch.zeros(1, 2048), ShardSpec.whole("embedding", (2048,)))


def test_projection_config_validates_and_builds_every_backend():
    assert set(projector_kinds()) >= {"dense", "gaussian", "rademacher", "sjlt"}
    for kind in ("dense", "gaussian", "rademacher", "sjlt"):
        p = build_projector(ProjectionConfig(kind=kind, k=16, keep_ratio=0.5, seed=3, sjlt_s=2))
        assert isinstance(p, Projector)  # the base.py protocol
        assert p.k == 16 and p.describe()["kind"] == kind and p.describe()["operator_version"] >= 1
        assert p.project(torch.randn(2, 10), ShardSpec.whole("w", (10,))).shape == (2, 16)
    assert isinstance(build_projector(kind="sjlt", k=8), SJLTProjector)
    assert build_projector(ProjectionConfig(k=8), kind="gaussian").kind == "gaussian"
    bad = [({"kind": "fft"}, "kind"), ({"k": 0}, "k"), ({"keep_ratio": 0}, "keep_ratio"),
           ({"keep_ratio": 1.5}, "keep_ratio"), ({"sjlt_s": 0}, "sjlt_s"), ({"k": 4, "sjlt_s": 5}, "sjlt_s"),
           ({"seed": -1}, "seed"), ({"block_size": -2}, "block_size"), ({"dense_operator": "x"}, "dense_operator"),
           ({"k": "big"}, "k"), ({"kk": 3}, "kk")]
    for data, key in bad:
        with pytest.raises(ConfigError) as err:
            from_dict(ProjectionConfig, data)
        assert err.value.key == key, (data, err.value)


def test_run_config_has_a_projection_section():
    from megatron_cropi.run_config import RunConfig

    cfg = from_dict(RunConfig, {"projection": {"kind": "gaussian", "k": 4096, "keep_ratio": 0.15}})
    assert cfg.projection.k == 4096 and cfg.projection.keep_ratio == 0.15
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"projection": {"k": -1}})
    assert err.value.key == "projection.k"


def test_register_projector_adds_a_backend():
    register_projector("sjlt8-test", lambda c: SJLTProjector(k=c.k, s=8))
    try:
        p = build_projector(ProjectionConfig(kind="sjlt8-test", k=64))
        assert p.s == 8
    finally:
        from megatron_cropi.projection import config as config_mod

        config_mod._REGISTRY.pop("sjlt8-test")


def _layout(local_name, global_name, pieces, owned=True):
    return SimpleNamespace(local_name=local_name, global_name=global_name, pieces=pieces, owned=owned)


def test_projection_pieces_count_replicated_and_tied_parameters_once():
    full = (slice(0, 4), slice(0, 3))
    emb = ShardSpec.whole("embedding.word_embeddings.weight", (4, 3))
    norm = ShardSpec.whole("decoder.final_layernorm.weight", (3,))
    layouts = {
        "output_layer.weight": _layout("output_layer.weight", emb.global_name, ((full, emb),)),
        "decoder.final_layernorm.weight": _layout("decoder.final_layernorm.weight", norm.global_name,
                                                  (((slice(0, 3),), norm),), owned=False),
    }
    last_stage = SimpleNamespace(pp_size=2, tp_size=2)
    names = [n for n, _, _ in projection_pieces(layouts, last_stage)]
    assert names == ["output_layer.weight"]  # partial tied gradient counts; non-owned norm skipped
    assert projection_pieces(layouts, last_stage, tied_grads_synced=True) == []
    grads = {"output_layer.weight": torch.randn(2, 4, 3), "decoder.final_layernorm.weight": torch.randn(2, 3)}
    p = SJLTProjector(k=8)
    out = project_local_gradients(p, grads, layouts, last_stage)
    assert torch.equal(out, p.project(grads["output_layer.weight"], emb))
    zero = project_local_gradients(p, grads, layouts, last_stage, tied_grads_synced=True)
    assert zero.shape == (2, 8) and zero.abs().sum() == 0
