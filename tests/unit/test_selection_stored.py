"""A selection on disk, whole or in parts (selection/stored.py).

The oracle for the order of parts is a plain sort by the policy's rule written out here: not demoted
first, then score descending, then row ascending.
"""

import json

import numpy as np
import pytest

from megatron_cropi.selection.policies import Selection
from megatron_cropi.selection.stored import (
    parts_dir,
    read_selection,
    write_selection,
    write_selection_head,
    write_selection_part,
)


def _parts(rng, n, world):
    rows = rng.permutation(1000)[:n]
    scores = np.round(rng.normal(size=n), 1)  # ties
    demoted = rng.random(n) < 0.3
    deal = rng.integers(0, world, size=n)
    return rows, scores, demoted, deal


@pytest.mark.parametrize("seed", range(5))
def test_parts_read_back_in_the_policy_order(tmp_path, seed):
    rng = np.random.default_rng(seed)
    world = int(rng.integers(1, 5))
    rows, scores, demoted, deal = _parts(rng, int(rng.integers(0, 40)), world)
    path = tmp_path / "selections" / "stage3.json"
    for rank in range(world):
        mine = deal == rank
        write_selection_part(path, rank, rows[mine], [f"p{r}" for r in rows[mine]], scores[mine], demoted[mine])
    assert read_selection(path) is None  # parts without a head: not a selection yet
    write_selection_head(path, stage=3, policy="cropi", parts=world, summary={"selected": int(rows.size)})
    got = read_selection(path)
    expect = sorted(range(rows.size), key=lambda i: (bool(demoted[i]), -scores[i], rows[i]))
    assert got.rows == [int(rows[i]) for i in expect]
    assert got.prompt_ids == [f"p{rows[i]}" for i in expect]
    assert got.scores == [float(scores[i]) for i in expect]
    assert (got.stage, got.policy, got.summary) == (3, "cropi", {"selected": int(rows.size)})
    assert "rows" not in json.loads(path.read_text())  # the head holds no pick


def test_a_whole_selection_reads_back_as_written(tmp_path):
    sel = Selection(stage=0, policy="random", rows=[4, 1], prompt_ids=["b", "a"], scores=[0.0, 0.0], summary={"x": 1})
    path = tmp_path / "stage0.json"
    write_selection(path, sel)
    assert read_selection(path) == sel
    assert not parts_dir(path).exists()


def test_a_head_whose_part_is_missing_names_it(tmp_path):
    path = tmp_path / "stage1.json"
    write_selection_part(path, 0, np.array([1]), ["a"], np.array([0.5]), np.array([False]))
    write_selection_head(path, stage=1, policy="cropi", parts=2, summary={})
    with pytest.raises(RuntimeError, match=r"part00001\.json.*rerun the stage's selection"):
        read_selection(path)
