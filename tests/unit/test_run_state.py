"""state.json: resume, refusing a changed config by name, and starting a new run without losing files."""

import json

import pytest

from megatron_cropi.curriculum.state import ConfigChangedError, RunState, config_diff


def test_resume_records_steps_and_refuses_changes(tmp_path):
    cfg = {"run": {"seed": 1, "num_threads": 2}, "selection": {"ratio": 0.1}, "projection": {"k": 64}}
    st = RunState.open(tmp_path / "out", cfg)
    st.mark_done("warmup", {"steps": 10})
    st.update(train_step=7)
    again = RunState.open(tmp_path / "out", cfg)
    assert again.is_done("warmup") and again.info("warmup") == {"steps": 10} and again.data["train_step"] == 7
    # a harmless key may change on resume
    RunState.open(tmp_path / "out", {**cfg, "run": {"seed": 1, "num_threads": 8}})
    changed = {**cfg, "selection": {"ratio": 0.2}, "projection": {"k": 128}}
    with pytest.raises(ConfigChangedError) as info:
        RunState.open(tmp_path / "out", changed)
    msg = str(info.value)
    assert "selection.ratio: 0.1 -> 0.2" in msg and "projection.k: 64 -> 128" in msg and "--new-run" in msg


def test_new_run_moves_old_outputs_aside(tmp_path):
    out = tmp_path / "out"
    st = RunState.open(out, {"a": 1})
    (out / "artefact.bin").write_bytes(b"x")
    st.mark_done("warmup")
    fresh = RunState.open(out, {"a": 2}, new_run=True)
    assert not fresh.is_done("warmup")
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("out.prev-")]
    assert len(archived) == 1 and (archived[0] / "artefact.bin").read_bytes() == b"x"
    assert json.loads((archived[0] / "state.json").read_text())["config"] == {"a": 1}


def test_config_diff_paths():
    assert config_diff({"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": [1], "d": 0}}) == [
        ("a.b", 1, 2), ("a.d", "<absent>", 0)]
