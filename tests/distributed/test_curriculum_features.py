"""``curriculum.keep_features: resume`` deletes each stage's feature stores once its selection is
recorded, and changes nothing else: the selections equal a run that keeps every store. So does
``scoring.scale_out`` (sharded pool store, selection where the cosines are, written in parts, the
probe reading rows from shards), also with its stores pruned."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml


def _run(tmp: Path, out: Path, nproc: int = 1, **changes) -> dict:
    from megatron_cropi.selection.stored import read_selection
    from megatron_cropi.testing.cli import run_cli
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    cfg = tmp / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump(tiny_curriculum_config(str(out), **changes)))
    rc, log = run_cli(["run", str(cfg)], timeout=400, nproc=nproc)
    assert rc == 0, log[-4000:]
    return {p.name: read_selection(p).prompt_ids for p in sorted((out / "selections").glob("stage*.json"))}


@pytest.mark.timeout(600)
def test_keep_features_resume_prunes_stores_and_keeps_selections(tmp_path):
    kept = _run(tmp_path, tmp_path / "all")
    pruned = _run(tmp_path, tmp_path / "resume", **{"curriculum.keep_features": "resume"})
    assert len(kept) == 2 and pruned == kept
    scale_out = _run(tmp_path, tmp_path / "scale_out", **{"scoring.scale_out": True,
                                                         "curriculum.keep_features": "resume"})
    assert scale_out == kept, "scale-out scoring selected other prompts"
    assert not any((tmp_path / "scale_out" / "features").iterdir())
    assert [p.name for p in (tmp_path / "all" / "features").iterdir()] != []
    assert not any((tmp_path / "resume" / "features").iterdir()), "a stage's feature stores were left on disk"
    # the stage report says how many target prompts the direction rests on (those with mixed β rewards)
    report = json.loads((tmp_path / "all" / "reports" / "stage0.json").read_text())
    used = report["target_prompts_used"]["cmp"]
    statuses = np.fromfile(tmp_path / "all" / "features" / "stage0" / "target-cmp" / "status.u8", dtype=np.uint8)
    assert used == {"used": int((statuses == 1).sum()), "of": 12}
    assert "target direction cmp: built from" in (tmp_path / "all" / "reports" / "stage0.md").read_text()


@pytest.mark.timeout(900)
def test_scale_out_under_torchrun_selects_what_rank0_scoring_selects(tmp_path):
    """Two ranks (DP = 2): the queue, the shards, the selection made and written where the cosines are,
    through `cropi run`."""
    plain = _run(tmp_path, tmp_path / "plain", nproc=2)
    sharded = _run(tmp_path, tmp_path / "sharded", nproc=2, **{"scoring.scale_out": True})
    assert len(plain) == 2 and sharded == plain
    # each replica writes its own shard, of the units it took from the queue: on a busy box one replica may
    # take them all (a slow replica taking fewer is tested in test_scale_out_scoring.py)
    writers = {d.name for d in (tmp_path / "sharded" / "features" / "stage0" / "pool" / "shards").iterdir()}
    assert writers and writers <= {"w00000", "w00001"}, writers
    # selected where the cosines are: each rank wrote its own picks, the head holds none
    head = json.loads((tmp_path / "sharded" / "selections" / "stage0.json").read_text())
    assert head["parts"] == 2 and "prompt_ids" not in head, head
    assert sorted(p.name for p in (tmp_path / "sharded" / "selections" / "stage0.parts").iterdir()) == [
        "part00000.json", "part00001.json"]
