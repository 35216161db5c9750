"""state.json: resume, refusing a changed config by name, and starting a new run without losing files."""

import json
import re
import shutil

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


# -- resume with a changed config: what may change, what may not ------------------------------------

from megatron_cropi.config.loader import from_dict, to_dict  # noqa: E402
from megatron_cropi.run_config import RunConfig  # noqa: E402  (registers the stored-config upgrade)


def _files_config(tmp_path, **sections):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("pool.jsonl", "val.jsonl"):
        if not (data / name).exists():
            (data / name).write_text('{"prompt": "1+1?", "answer": "2"}\n')
    model = tmp_path / "model"
    if not model.exists():
        model.mkdir()
        (model / "config.json").write_text('{"hidden_size": 8}')
        (model / "model.safetensors").write_bytes(b"\0" * 64)
    base = {"data": {"kind": "files", "tokenizer": str(model), "pool": [{"path": str(data / "pool.jsonl")}],
                     "val": [{"path": str(data / "val.jsonl")}]},
            "rollout": {"engine": "vllm", "checkpoint": str(model)}}
    for key, value in sections.items():
        section, _, name = key.partition("__")
        base.setdefault(section, {})[name] = value
    return to_dict(from_dict(RunConfig, base))


def _with(cfg, dotted, value):
    out = json.loads(json.dumps(cfg))
    node = out
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return out


@pytest.mark.parametrize("key, value", [
    ("grpo.eval_interval", 5), ("curriculum.eval.every", 7), ("grpo.checkpoint.save_interval", 3),
    ("grpo.checkpoint.keep_last", 5), ("grpo.log_interval", 10), ("rollout.progress", False),
    ("curriculum.plot", False), ("rollout.vllm.gpu_memory_utilization", 0.35), ("run.num_threads", 4),
    ("rollout.reward.num_workers", 16), ("curriculum.keep_features", "resume"),
    ("curriculum.trainer.command", "bash train.sh {checkpoint_in} {checkpoint_out}"),
    ("curriculum.reuse_rollouts_from", "runs/other"), ("curriculum.background_wait_s", 60.0),
])
def test_presentation_cadence_and_engine_memory_may_change_on_resume(tmp_path, key, value):
    cfg = _files_config(tmp_path)
    RunState.open(tmp_path / "out", cfg).mark_done("rollouts")
    again = RunState.open(tmp_path / "out", _with(cfg, key, value))
    assert again.is_done("rollouts")
    (change,) = again.data["config_changes"][-1]["changes"]
    assert change[0] == key and change[2] == value
    assert json.loads((tmp_path / "out" / "state.json").read_text())["config"] == _with(cfg, key, value)


@pytest.mark.parametrize("key, value", [
    ("run.seed", 7), ("projection.k", 64), ("selection.ratio", 0.2), ("grpo.optim.lr", 1e-5),
    ("rollout.temperature", 0.7), ("curriculum.pool_samples", 4), ("rollout.vllm.dtype", "bfloat16"),
    ("curriculum.warmup.eval_every", 10),
])
def test_what_would_make_finished_work_wrong_is_still_refused(tmp_path, key, value):
    cfg = _files_config(tmp_path)
    RunState.open(tmp_path / "out", cfg)
    with pytest.raises(ConfigChangedError, match=re.escape(key)):
        RunState.open(tmp_path / "out", _with(cfg, key, value))


def test_a_moved_path_with_the_same_content_may_change(tmp_path):
    cfg = _files_config(tmp_path)
    RunState.open(tmp_path / "out", cfg).mark_done("rollouts")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "data", moved / "data")
    shutil.copytree(tmp_path / "model", moved / "model")
    shutil.rmtree(tmp_path / "data")   # the old paths are gone: the digests recorded at the start decide
    shutil.rmtree(tmp_path / "model")
    new = _with(cfg, "data.pool", [{**cfg["data"]["pool"][0], "path": str(moved / "data" / "pool.jsonl")}])
    new = _with(new, "rollout.checkpoint", str(moved / "model"))
    new = _with(new, "data.tokenizer", str(moved / "model"))
    again = RunState.open(tmp_path / "out", new)
    assert again.is_done("rollouts")
    reasons = {k: why for k, _, _, why in again.data["config_changes"][-1]["changes"]}
    assert reasons == {"data.pool[0].path": "same content", "rollout.checkpoint": "same content",
                       "data.tokenizer": "same content"}
    assert again.data["content"]["rollout.checkpoint"]["path"] == str(moved / "model")


def test_a_path_to_other_content_is_refused(tmp_path):
    cfg = _files_config(tmp_path)
    RunState.open(tmp_path / "out", cfg)
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    new = _with(cfg, "data.pool", [{**cfg["data"]["pool"][0], "path": str(other)}])
    with pytest.raises(ConfigChangedError, match=r"data\.pool\[0\]\.path: .* \(different content\)"):
        RunState.open(tmp_path / "out", new)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\1" * 64)  # same path, new weights: the
    copy = tmp_path / "model2"                                             # store headers catch that;
    shutil.copytree(tmp_path / "model", copy)                              # a new path must match the
    with pytest.raises(ConfigChangedError, match=r"rollout\.checkpoint.*different content"):  # recorded digest
        RunState.open(tmp_path / "out", _with(cfg, "rollout.checkpoint", str(copy)))


def test_a_key_added_to_the_schema_since_the_run_started_may_be_absent(tmp_path):
    cfg = _files_config(tmp_path)
    RunState.open(tmp_path / "out", cfg).mark_done("warmup")
    state_file = tmp_path / "out" / "state.json"
    data = json.loads(state_file.read_text())
    del data["config"]["grpo"]["loss"]["dual_clip_c"]           # as if the run predates these keys
    del data["config"]["scoring"]["truncate_backward"]
    data["config"]["grpo"]["removed_since"] = 3                  # and had one the schema dropped
    state_file.write_text(json.dumps(data))
    again = RunState.open(tmp_path / "out", cfg)                 # new keys at their defaults: accepted
    assert again.is_done("warmup")
    reasons = {k: why for k, _, _, why in again.data["config_changes"][-1]["changes"]}
    assert reasons == {"grpo.removed_since": "no longer in the config schema"}
    data = json.loads(state_file.read_text())
    del data["config"]["scoring"]["truncate_backward"]
    state_file.write_text(json.dumps(data))
    with pytest.raises(ConfigChangedError, match=r"scoring\.truncate_backward: False -> True"):  # not the default
        RunState.open(tmp_path / "out", _with(cfg, "scoring.truncate_backward", True))


def test_config_diff_descends_into_lists_of_the_same_length():
    assert config_diff({"p": [{"path": "a"}, {"path": "b"}]}, {"p": [{"path": "a"}, {"path": "c"}]}) == [
        ("p[1].path", "b", "c")]
    assert config_diff({"p": [1]}, {"p": [1, 2]}) == [("p", [1], [1, 2])]
