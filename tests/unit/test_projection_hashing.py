"""The counter-based generator against a pure-Python integer reference, and its statistics."""

import math

import pytest
import torch

from megatron_cropi.projection import hashing as H
from megatron_cropi.projection.base import ShardSpec
from megatron_cropi.projection.shards import global_index_tiles, kept_local_indices

M64 = (1 << 64) - 1


def _hash64_py(key: int, j: int) -> int:
    return H._mix64_py((key + j * H.GOLDEN64) & M64)


def _lowbias32_py(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _u64(v: int) -> int:
    return v & M64


INDICES = [0, 1, 2, 3, 12345, (1 << 31) - 1, 1 << 31, (1 << 40) + 17, (1 << 62) + 5]


def test_splitmix64_matches_python_reference():
    # the published first output of SplitMix64 seeded with 0 (state advanced once by φ)
    assert H._mix64_py(H.GOLDEN64) == 0xE220A8397B1DCDAF
    key = H.stream_key(7, H.STREAM_KEEP, "decoder.layers.0.mlp.linear_fc1.weight")
    got = H.hash64(key, torch.tensor(INDICES, dtype=torch.int64))
    for j, h in zip(INDICES, got.tolist()):
        assert _u64(h) == _hash64_py(key, j), j
    assert got.unique().numel() == len(INDICES)


def test_high_low_32_split_the_word_exactly():
    key = H.stream_key(1, H.STREAM_COLUMN, "w")
    h = H.hash64(key, torch.arange(1000, dtype=torch.int64))
    hi, lo = H.high32(h), H.low32(h)
    assert lo.dtype == torch.int32 and hi.min() >= 0 and hi.max() < 2**32
    for a, b, c in zip(h.tolist()[:50], hi.tolist()[:50], lo.tolist()[:50]):
        assert _u64(a) >> 32 == b and _u64(a) & 0xFFFFFFFF == c & 0xFFFFFFFF


def test_lowbias32_and_matrix_words_match_reference():
    x = torch.tensor([0, 1, -1, 2**31 - 1, -(2**31), 123456789], dtype=torch.int32)
    got = H.mix32_(x.clone())
    for a, b in zip(x.tolist(), got.tolist()):
        assert _lowbias32_py(a) == b & 0xFFFFFFFF
    cols = torch.tensor([5, -7, 2**30], dtype=torch.int32)
    rows = H.row_keys(3, 4)
    words = H.gaussian_words(cols, rows)
    for i, c in enumerate(cols.tolist()):
        for r, rk in enumerate(rows.tolist()):
            assert words[i, r].item() & 0xFFFFFFFF == _lowbias32_py(c ^ rk)


def test_words_split_into_low_then_high_halves():
    words = torch.tensor([[0x00020001, 0x7FFF8000]], dtype=torch.int32)
    table = torch.arange(1 << 16, dtype=torch.float32)
    ent = H.words_to_entries(words, table)
    assert ent.tolist() == [[1.0, 2.0, 32768.0, 32767.0]]


def test_stream_keys_differ_by_seed_stream_and_name():
    keys = {H.stream_key(s, st, n) for s in (0, 1) for st in (H.STREAM_KEEP, H.STREAM_COLUMN) for n in ("a", "b")}
    assert len(keys) == 8
    assert H.stream_key(0, 1, "a") == H.stream_key(0, 1, H.name_hash("a"))


def test_kept_fraction_is_binomial():
    q, n = 0.1, 200_000
    key = H.stream_key(0, H.STREAM_KEEP, "p")
    kept = H.kept_mask(key, torch.arange(n, dtype=torch.int64), H.keep_threshold(q)).sum().item()
    sd = math.sqrt(n * q * (1 - q))
    assert abs(kept - n * q) < 5 * sd
    assert H.kept_mask(key, torch.arange(10, dtype=torch.int64), H.keep_threshold(1.0)).all()
    with pytest.raises(ValueError, match="keep_ratio"):
        H.keep_threshold(0.0)


def test_gaussian_table_is_a_unit_normal_and_rademacher_its_sign():
    g = H.gaussian_table("gaussian").double()
    assert abs(g.mean().item()) < 1e-6 and abs(g.var(unbiased=False).item() - 1) < 1e-6
    assert abs(((g**4).mean() - 3).item()) < 0.01  # Gaussian kurtosis
    r = H.gaussian_table("rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and torch.equal(r, torch.sign(H.gaussian_table()))


def test_gaussian_columns_are_uncorrelated():
    """Entries of distinct columns (including keys one bit apart) behave as independent N(0,1)."""
    k, m = 4096, 64
    keys = H.column_keys(0, "w", torch.arange(m, dtype=torch.int64))
    keys = torch.cat([keys, keys ^ 1, keys ^ (1 << 31)])  # adversarial: one-bit-apart keys
    cols = H.words_to_entries(H.gaussian_words(keys, H.row_keys(0, k // 2)), H.gaussian_table()).double()
    gram = cols @ cols.t() / k
    off = gram - torch.diag(torch.diag(gram))
    assert (torch.diag(gram) - 1).abs().max() < 6 * math.sqrt(2 / k)
    assert off.abs().max() < 6 / math.sqrt(k)  # max of ~18k N(0, 1/k) entries stays below 6σ


def test_sjlt_slots_are_distinct_per_coordinate_and_in_their_blocks():
    k, s = 100, 4
    j = torch.arange(5000, dtype=torch.int64)
    slots, signs = H.sjlt_slots_signs(3, "p", j, k, s)
    for t in range(s):
        assert slots[t].min() >= t * k // s and slots[t].max() < (t + 1) * k // s
    assert set(signs.unique().tolist()) == {-1, 1}
    assert abs(signs.float().mean().item()) < 5 / math.sqrt(signs.numel())
    counts = torch.bincount(slots[0], minlength=k)[: k // s].float()
    assert counts.min() > 0 and counts.std() / counts.mean() < 0.25  # roughly uniform
    with pytest.raises(ValueError, match="1 <= s <= k"):
        H.sjlt_slots_signs(0, "p", j, 4, 5)


@pytest.mark.parametrize("spec", [
    ShardSpec("w", (6, 10), (2, 0), (3, 10)),
    ShardSpec("w", (6, 10), (0, 5), (6, 5)),
    ShardSpec("w", (4, 6, 8), (1, 2, 4), (2, 3, 4)),
    ShardSpec("b", (37,), (5,), (20,)),
    ShardSpec("s", (), (), ()),
])
def test_global_indices_are_row_major_in_the_global_shape(spec):
    glob = torch.arange(math.prod(spec.global_shape), dtype=torch.int64).reshape(spec.global_shape)
    expected = glob[spec.global_slices()].reshape(-1)
    for tile in (1, 3, 1 << 20):  # tiling (chunk size) never changes the indices
        got = torch.cat([g.reshape(-1) for _, _, g in global_index_tiles(spec, tile_elems=tile)])
        assert torch.equal(got, expected)
        local, g2 = kept_local_indices(spec, 0, 0.5, tile_elems=tile)
        assert torch.equal(expected[local], g2)
        assert torch.all(local[1:] > local[:-1])
