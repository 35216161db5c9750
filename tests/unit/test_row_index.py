"""The trajectory store's compact index against a plain dictionary and Python's ``sorted`` (the oracle)."""

import numpy as np
import pytest

from megatron_cropi.rollout.row_index import RowIndex

ALPHABET = list("abzAZ09_-:é∑😀")


def _ids(rng, n):
    seen = set()
    while len(seen) < n:
        seen.add("".join(rng.choice(ALPHABET, int(rng.integers(1, 12)))))
    ids = list(seen)
    rng.shuffle(ids)
    return ids


@pytest.mark.parametrize("seed", range(6))
def test_the_index_is_sorted_order_and_finds_every_row_as_a_dictionary_would(seed):
    rng = np.random.default_rng(seed)
    ids = _ids(rng, int(rng.integers(1, 300)))
    cuts = sorted(rng.integers(0, len(ids), int(rng.integers(0, 6))).tolist() + [0, len(ids)])  # empty parts too
    parts = [(f"part-{j:06d}.arrow", ids[a:b]) for j, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    oracle = {pid: (name, row) for name, part in parts for row, pid in enumerate(part)}

    index = RowIndex()
    split = int(rng.integers(0, len(parts) + 1))  # some parts at once (opening), the rest one by one (appends)
    index.add_parts(iter(parts[:split]))
    for name, part in parts[split:]:
        if index.names:  # a by-part grouping built before an append must not go stale
            index.positions_of_part(index.names[0])
        index.add_part(name, part)

    assert index.prompt_ids() == sorted(ids) == list(index.view()) and len(index) == len(ids)
    assert index.view()[3:7] == sorted(ids)[3:7]
    for pos, pid in enumerate(sorted(ids)):
        assert index.position(pid) == pos and index.locate(pos) == oracle[pid]
    for absent in ("", "zz" * 20, sorted(ids)[0] + "\x01", "ÿ"):
        if absent not in oracle:
            assert index.position(absent) == -1
    # a column read from each part lands at each id's sorted position
    values = np.full(len(ids), -1)
    for name, part in parts:
        positions, rows = index.positions_of_part(name)
        assert rows.tolist() == list(range(len(part)))
        values[positions] = [hash(part[r]) for r in rows]
    assert values.tolist() == [hash(pid) for pid in sorted(ids)]


def test_an_empty_index_holds_nothing():
    index = RowIndex()
    assert len(index) == 0 and index.position("a") == -1 and index.prompt_ids() == [] and list(index.view()) == []


def test_coded_strings_read_as_the_list_they_encode():
    from megatron_cropi.rollout.row_index import CodedStrings

    column = CodedStrings(np.array([2, 0, 0, 1], np.int32), ["add", "max", "sub"])
    assert list(column) == ["sub", "add", "add", "max"] and column[3] == "max" and column[1:3] == ["add", "add"]
    assert len(column) == 4 and "sub" in column


def test_an_id_ending_in_nul_is_refused():
    with pytest.raises(ValueError, match="ends in a NUL"):
        RowIndex().add_part("part-000000.arrow", ["a", "b\x00"])
