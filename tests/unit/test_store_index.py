"""A complete trajectory store's memory-mapped index and columns against the groups that were written
(the oracle: Python's ``sorted`` of their ids, each group's own rewards and source), and the sharded
feature store's unit plan read back."""

import json
import logging

import numpy as np
import pytest

from megatron_cropi.influence.sharded_store import ShardedFeatureStore, UnitPlan
from megatron_cropi.rollout.store import TrajectoryStore

from tests.unit.test_trajectory_store import assert_same_group, header_for, make_groups


def _complete_store(path, groups, cuts=(0, 7, 19)):
    store = TrajectoryStore.open_for_append(path, header_for(groups))
    for a, b in zip(cuts, list(cuts[1:]) + [len(groups)]):
        store.append(groups[a:b])
    store.mark_complete()
    return store


def _expected_columns(groups):
    by_id = sorted(groups, key=lambda g: g.prompt_id)
    rates = [float((g.rewards > 0.5).mean()) if len(g.rewards) else 0.0 for g in by_id]
    return [g.prompt_id for g in by_id], rates, [g.prompt.source for g in by_id]


def test_a_completed_store_reads_its_index_and_columns_memory_mapped(tmp_path):
    groups = make_groups(31)
    _complete_store(tmp_path / "s", groups)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["index"]["rows"] == 31 and manifest["index"]["parts"] == 3

    store = TrajectoryStore.open(tmp_path / "s")
    rates, sources = store.pass_rates_and_sources()
    assert isinstance(rates, np.memmap) and isinstance(sources.codes, np.memmap)  # file pages, not private memory
    ids, want_rates, want_sources = _expected_columns(groups)
    assert store.prompt_ids() == ids and list(store.prompt_id_view()) == ids
    np.testing.assert_allclose(rates, want_rates)
    assert list(sources) == want_sources
    by_id = {g.prompt_id: g for g in groups}
    for position, pid in enumerate(ids):
        assert pid in store
        assert_same_group(by_id[pid], store.group_at(position))
        assert_same_group(by_id[pid], store.get(pid))
    assert "absent" not in store
    # the row summary scale-out plans from, mapped, equals the one read column-wise from the parts
    summary = store.row_summary()
    assert all(isinstance(v, np.memmap) for v in summary.values())
    unmapped = TrajectoryStore.open(tmp_path / "s").row_summary(max_responses=3)  # 3 = all responses: read
    for name, column in summary.items():
        assert not isinstance(unmapped[name], np.memmap)
        np.testing.assert_array_equal(column, unmapped[name])
    for position, pid in enumerate(ids):
        g = by_id[pid]
        longest = len(g.prompt.token_ids) + max(len(r.token_ids) for r in g.responses)
        assert summary["longest"][position] == longest
        assert summary["zero_variance"][position] == (len(set(g.rewards.tolist())) == 1)


@pytest.mark.parametrize("damage", ["size", "missing", "entry"])
def test_a_damaged_index_is_rebuilt_in_memory_with_the_same_answers(tmp_path, caplog, damage):
    groups = make_groups(23)
    _complete_store(tmp_path / "s", groups)
    if damage == "size":
        with open(tmp_path / "s" / "index" / "row.npy", "ab") as f:
            f.write(b"\0" * 8)
    elif damage == "missing":
        (tmp_path / "s" / "index" / "pass_rate.npy").unlink()
    else:  # the entry names fewer parts than the manifest holds
        manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
        manifest["index"]["parts"] = 1
        (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        store = TrajectoryStore.open(tmp_path / "s")
    assert "indexing in memory" in caplog.text
    rates, sources = store.pass_rates_and_sources()
    assert not isinstance(rates, np.memmap)
    ids, want_rates, want_sources = _expected_columns(groups)
    assert store.prompt_ids() == ids and list(sources) == want_sources
    np.testing.assert_allclose(rates, want_rates)


def test_an_append_or_a_repair_drops_the_index_entry(tmp_path):
    groups = make_groups(12)
    store = _complete_store(tmp_path / "s", groups[:10], cuts=(0, 5))
    assert "index" in json.loads((tmp_path / "s" / "manifest.json").read_text())
    # an append after completion (not how the runner writes, but allowed) makes the index stale
    reopened = TrajectoryStore.open_for_append(tmp_path / "s", store.header)
    reopened.append(groups[10:])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert "index" not in manifest
    rates, sources = reopened.pass_rates_and_sources()
    assert len(rates) == 12 and reopened.prompt_ids() == sorted(g.prompt_id for g in groups)


def test_an_incomplete_store_has_no_index(tmp_path):
    groups = make_groups(8)
    store = TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups))
    store.append(groups[:5])
    assert not (tmp_path / "s" / "index").exists()
    assert TrajectoryStore.open(tmp_path / "s").prompt_ids() == sorted(g.prompt_id for g in groups[:5])


def test_the_unit_plan_is_kept_with_the_sharded_store_and_read_back(tmp_path):
    from megatron_cropi.influence.feature_store import FeatureHeader

    header = FeatureHeader(num_rows=10, k=4, seed=1, projector="{}", param_set_hash="p", checkpoint_step=0,
                           prompt_id_hash="h", dtype="float32", responses_per_prompt=0)
    units = np.array([[0, 3, 16, 2, 40], [3, 4, 8, 1, 9]], np.int64)
    plan = UnitPlan(units, np.array([5, 1, 7, 2], np.int64))
    ShardedFeatureStore.open(tmp_path / "f", header, excluded=np.array([0, 3]), plan_hash="x", plan=plan)
    back = ShardedFeatureStore.load(tmp_path / "f").unit_plan()
    assert len(back) == 2 and isinstance(back.rows, np.memmap)
    rows, seq, ppm, tokens = back.unit(0)
    assert rows.tolist() == [5, 1, 7] and (seq, ppm, tokens) == (16, 2, 40)
    assert back.unit(1)[0].tolist() == [2]
    # a store begun before plans were kept gets its plan on reopen (same plan hash)
    for name in ("plan_units.npy", "plan_rows.npy"):
        (tmp_path / "f" / name).unlink()
    ShardedFeatureStore.open(tmp_path / "f", header, plan_hash="x", plan=plan)
    assert ShardedFeatureStore.load(tmp_path / "f").unit_plan().unit(0)[0].tolist() == [5, 1, 7]


def test_parts_closed_to_keep_few_open_read_the_same_groups_when_opened_again(tmp_path, monkeypatch):
    import megatron_cropi.rollout.store as store_module

    groups = make_groups(30)
    _complete_store(tmp_path / "s", groups, cuts=tuple(range(0, 30, 3)))  # 10 parts
    monkeypatch.setattr(store_module, "OPEN_PARTS", 2)
    store = TrajectoryStore.open(tmp_path / "s")
    by_id = {g.prompt_id: g for g in groups}
    for _ in range(2):  # parts closed and opened again read the same groups
        for position, pid in enumerate(store.prompt_ids()):
            assert_same_group(by_id[pid], store.group_at(position))
