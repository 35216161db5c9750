"""Feature stores in float32/float16/bfloat16: round trips, header, resume refusal, overflow, pruning."""

import json
import warnings

import numpy as np
import pytest

from megatron_cropi.influence.feature_store import DONE, EXCLUDED, FEATURE_DTYPES, PENDING, FeatureHeader, \
    FeatureStore, FeatureStoreMismatch, decode_features, encode_features, feature_bytes_per_row, \
    prune_feature_stores

K = 64


def _header(n, dtype="float32", k=K):
    return FeatureHeader(num_rows=n, k=k, seed=0, projector="sjlt", param_set_hash="h", checkpoint_step=0,
                         prompt_id_hash="p", dtype=dtype)


def _rows(n=12, k=K, seed=0):
    rng = np.random.default_rng(seed)
    # rows of very different scales, as projected gradients are (1e-6 .. 1e3)
    return (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-6, 3, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_round_trip_within_tolerance(dtype, tmp_path):
    x = _rows()
    store = FeatureStore.open(tmp_path / "s", _header(len(x), dtype))
    store.write_rows(np.arange(len(x)), x, np.full(len(x), DONE))
    back = FeatureStore.load(tmp_path / "s").matrix()
    assert back.dtype == np.float32 and back.shape == x.shape
    err = np.abs(back.astype(np.float64) - x)
    if dtype == "float32":
        assert np.array_equal(back, x)
    elif dtype == "bfloat16":
        assert np.all(err <= 2.0 ** -8 * np.abs(x))  # round to nearest even: relative error ≤ 2^-8
        assert np.array_equal(encode_features(back, dtype)[0], store.features[: len(x)])  # exact re-encoding
    else:
        rowmax = np.abs(x).max(1, keepdims=True).astype(np.float64)
        assert np.all(err <= 2.0 ** -11 * rowmax)
    assert np.array_equal(store.read_rows([3, 0]), back[[3, 0]])


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_header_records_dtype_and_files_are_smaller(dtype, tmp_path):
    FeatureStore.open(tmp_path / "s", _header(10, dtype))
    assert json.loads((tmp_path / "s" / "header.json").read_text())["dtype"] == dtype
    assert FeatureStore.load(tmp_path / "s").header.dtype == dtype
    on_disk = sum(f.stat().st_size for f in (tmp_path / "s").iterdir() if f.name != "header.json")
    assert on_disk == 10 * feature_bytes_per_row(dtype, K)
    assert feature_bytes_per_row(dtype, K) == {"float32": 4 * K + 1, "float16": 2 * K + 5, "bfloat16": 2 * K + 1}[dtype]


def test_header_without_dtype_reads_as_float32(tmp_path):
    FeatureStore.open(tmp_path / "s", _header(4))
    data = json.loads((tmp_path / "s" / "header.json").read_text())
    del data["dtype"]  # a store written before the option existed
    (tmp_path / "s" / "header.json").write_text(json.dumps(data))
    assert FeatureStore.open(tmp_path / "s", _header(4)).header.dtype == "float32"


def test_resume_with_another_dtype_is_refused_naming_both(tmp_path):
    store = FeatureStore.open(tmp_path / "s", _header(6, "float32"))
    store.write_rows([0, 1], _rows(2), [DONE, DONE])
    with pytest.raises(FeatureStoreMismatch) as info:
        FeatureStore.open(tmp_path / "s", _header(6, "bfloat16"))
    assert "dtype='float32'" in str(info.value) and "dtype='bfloat16'" in str(info.value)
    assert FeatureStore.open(tmp_path / "s", _header(6, "float32")).pending_rows().tolist() == [2, 3, 4, 5]


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="float64"):
        _header(3, "float64")


def test_float16_huge_and_tiny_values_do_not_overflow_or_vanish(tmp_path):
    x = np.zeros((4, K), np.float32)
    x[0] = np.linspace(-1e6, 1e6, K)
    x[1] = 3.0e38 * np.cos(np.arange(K))  # near float32's max
    x[2] = 1e-9 * np.sin(np.arange(K) + 1)  # below float16's smallest subnormal without scaling
    store = FeatureStore.open(tmp_path / "s", _header(4, "float16"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow in the cast
        store.write_rows(np.arange(4), x, [DONE, DONE, DONE, EXCLUDED])
        back = store.matrix()
    assert np.all(np.isfinite(back))
    rowmax = np.abs(x).max(1, keepdims=True).astype(np.float64)
    assert np.all(np.abs(back.astype(np.float64) - x) <= 2.0 ** -11 * rowmax)
    assert np.all(back[3] == 0) and np.all(np.abs(back[2]).sum() > 0)


def test_bfloat16_special_values():
    x = np.array([[0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -3.0e38, 1e-40]], np.float32)
    stored, scales = encode_features(x, "bfloat16")
    back = decode_features(stored, "bfloat16", scales)
    assert np.array_equal(back[0, :4], x[0, :4]) and np.signbit(back[0, 1])
    assert np.isnan(back[0, 4]) and back[0, 5] == 1.0
    assert abs(back[0, 6] + 3.0e38) <= 2.0 ** -8 * 3.0e38


def test_float16_store_resume_keeps_written_rows(tmp_path):
    x = _rows(6)
    store = FeatureStore.open(tmp_path / "s", _header(6, "float16"))
    store.write_rows([0, 1, 2], x[:3], [DONE] * 3)
    again = FeatureStore.open(tmp_path / "s", _header(6, "float16"))
    assert again.pending_rows().tolist() == [3, 4, 5] and (again.statuses()[3:] == PENDING).all()
    again.write_rows([3, 4, 5], x[3:], [DONE] * 3)
    assert np.array_equal(again.matrix()[:3], store.matrix()[:3]) and again.complete


def test_prune_feature_stores(tmp_path):
    root = tmp_path / "features"
    sizes = {}
    for m in range(4):
        for name in ("pool", "target-a"):
            FeatureStore.open(root / f"stage{m}" / name, _header(5))
        sizes[m] = sum(f.stat().st_size for f in (root / f"stage{m}").rglob("*") if f.is_file())
    (root / "step0").mkdir()  # not a stage: left alone
    (root / "notes.txt").write_text("x")
    leftover = root / ".stage9.pruning"  # an interrupted earlier prune
    leftover.mkdir()
    (leftover / "junk").write_bytes(b"12345")
    freed = prune_feature_stores(root, {1, 3})
    assert freed == sizes[0] + sizes[2] + 5
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "stage1", "stage3", "step0"]
    assert FeatureStore.load(root / "stage3" / "pool").header.num_rows == 5
    assert prune_feature_stores(root, {1, 3}) == 0
    assert prune_feature_stores(tmp_path / "absent", set()) == 0


def test_scoring_config_feature_dtype():
    from megatron_cropi.config.loader import ConfigError, from_dict
    from megatron_cropi.influence.scorer import ScoringConfig

    assert ScoringConfig().feature_dtype == "float32"
    assert from_dict(ScoringConfig, {"feature_dtype": "bfloat16"}).feature_dtype == "bfloat16"
    with pytest.raises(ConfigError) as info:
        from_dict(ScoringConfig, {"feature_dtype": "float64"})
    assert "feature_dtype" in str(info.value) and "float64" in str(info.value)
    with pytest.raises(ConfigError, match="feature_dtype"):
        ScoringConfig(feature_dtype="int8")


def test_prune_after_a_prune_died_between_rename_and_delete(tmp_path):
    """A stage's leftover ``.stage{m}.pruning`` and a new ``stage{m}`` (re-scored) are both removed once."""
    root = tmp_path / "features"
    FeatureStore.open(root / "stage0" / "pool", _header(5))
    (root / "stage0").rename(root / ".stage0.pruning")  # the earlier prune died here
    FeatureStore.open(root / "stage0" / "pool", _header(5))
    assert prune_feature_stores(root, set()) > 0
    assert list(root.iterdir()) == []
