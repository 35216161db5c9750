"""Config loading: unknown keys, wrong types and out-of-range values name the key and the value."""

import textwrap

import pytest

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.run_config import RunConfig, load_run_config


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_config_loads():
    cfg = load_run_config("examples/configs/tiny_cpu.yaml")
    assert cfg.model.preset == "cpu-default"
    assert cfg.model.transformer["normalization"] == "RMSNorm"
    assert cfg.model.transformer["gated_linear_unit"] is True
    assert cfg.parallel.tensor_model_parallel_size == 1


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("run: {ouput_dir: x}", "run.ouput_dir", "unknown key"),
        ("parallel: {tensor_model_parallel_size: two}", "parallel.tensor_model_parallel_size", "expected int"),
        ("parallel: {tensor_model_parallel_size: 0}", "parallel.tensor_model_parallel_size", "between 1 and"),
        ("parallel: {tensor_model_parallel_size: true}", "parallel.tensor_model_parallel_size", "expected int"),
        ("model: {preset: tiny, params_dtype: float64}", "model.params_dtype", "one of"),
        ("model: {preset: huge}", "model.preset", "expected one of"),
        ("model: {transformer: {hiden_size: 8}}", "model.transformer.hiden_size", "TransformerConfig"),
        ("model: {transformer: {activation_func: relu}}", "model.transformer.activation_func", "model.activation"),
        ("model: {transformer: {num_layers: -1}}", "model.transformer.num_layers", ">= 1"),
        ("model: {transformer: {num_query_groups: 3}}", "model.transformer.num_query_groups", "divide"),
        ("model: {preset: custom}", "model.vocab_size", "required"),
        ("run: {seed: -3}", "run.seed", ">= 0"),
        ("model: [1, 2]", "model", "expected a mapping"),
    ],
)
def test_bad_values_name_key_and_value(tmp_path, text, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_run_config(_write(tmp_path, text))
    assert info.value.key == key
    assert fragment in str(info.value)
    assert "cfg.yaml" in str(info.value)


def test_layout_the_model_cannot_take_is_rejected(tmp_path):
    text = "parallel: {tensor_model_parallel_size: 8}\nmodel: {preset: tiny}"
    with pytest.raises(ConfigError) as info:
        load_run_config(_write(tmp_path, text))
    assert info.value.key == "parallel"
    assert "num_attention_heads=4 is not divisible by TP=8" in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(_write(tmp_path, "run: {output_dir: [unclosed"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_run_config(_write(tmp_path, "- a\n- b\n"))


def test_yaml_scientific_floats_and_presets_resolve():
    cfg = from_dict(RunConfig, {"model": {"preset": "qwen2.5-7b", "rotary_base": "1e6"}})
    assert cfg.model.rotary_base == 1e6
    assert cfg.model.tie_word_embeddings is False
    assert cfg.model.num_query_groups == 4
    # parameter count of Qwen2.5-7B (7.62e9 published) within 1%
    assert abs(cfg.model.num_parameters() - 7.62e9) / 7.62e9 < 0.01
    small = from_dict(RunConfig, {"model": {"preset": "qwen2.5-1.5b"}})
    assert abs(small.model.num_parameters() - 1.54e9) / 1.54e9 < 0.01


def test_config_is_frozen():
    cfg = from_dict(RunConfig, {})
    with pytest.raises(Exception):
        cfg.run.seed = 3


@pytest.mark.parametrize("data, key, fragment", [
    ({"pool": [{"path": "/d/gsm8k.parquet", "format": "gsm8k"}], "tokenizer": "/tok"}, "data.pool", "set data.kind: files"),
    ({"val": [{"path": "/d/v.jsonl"}]}, "data.val", "'/d/v.jsonl'"),
    ({"tokenizer": "/models/qwen"}, "data.tokenizer", "data.kind is 'synthetic'"),
    ({"max_prompt_tokens": 512}, "data.max_prompt_tokens", "512"),
    ({"system_prompt": "Think."}, "data.system_prompt", "data.kind: files only"),
    ({"kind": "files", "tokenizer": "/tok", "pool": [{"path": "a.jsonl"}], "synthetic": {"per_family": 3}},
     "data.synthetic.per_family", "data.kind is 'files'"),
])
def test_keys_the_data_kind_ignores_are_errors_naming_them(data, key, fragment):
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, {"data": data})
    assert info.value.key == key and fragment in str(info.value)


def test_keys_set_to_their_defaults_are_not_ignored_keys():
    from_dict(RunConfig, {"data": {"kind": "synthetic", "pool": [], "use_chat_template": True, "tokenizer": ""}})
    from_dict(RunConfig, {"data": {"kind": "files", "tokenizer": "/tok", "pool": [{"path": "a.jsonl"}],
                                   "synthetic": {"per_family": 160}}})


def test_keys_the_engine_or_the_data_ignore_at_run_level(tmp_path):
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, {"rollout": {"engine": "native", "vllm": {"gpu_memory_utilization": 0.3}}})
    assert info.value.key == "rollout.vllm.gpu_memory_utilization" and "0.3" in str(info.value)
    from_dict(RunConfig, {"rollout": {"engine": "vllm", "checkpoint": "/m", "vllm": {"gpu_memory_utilization": 0.3}}})
    files = {"kind": "files", "tokenizer": "/tok", "pool": [{"path": "a.jsonl"}]}
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, {"data": files, "curriculum": {"warmup": {"enabled": True}}})
    assert info.value.key == "curriculum.warmup.enabled"
    # an override switching the engine can drop the engine's section in the same breath
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rollout: {engine: vllm, checkpoint: /m, vllm: {dtype: bfloat16}}\n")
    assert load_run_config(cfg, ["rollout.engine=native", "rollout.vllm={}"]).rollout.engine == "native"


def test_selected_stages_bounds_and_the_whole_pool_past_them():
    from megatron_cropi.config.loader import ConfigError
    from megatron_cropi.curriculum.config import CurriculumConfig
    from megatron_cropi.curriculum.steps import stage_selection
    from megatron_cropi.selection.guard import GuardConfig
    from megatron_cropi.selection.policies import SelectionConfig

    with pytest.raises(ConfigError, match="selected_stages.*3"):
        CurriculumConfig(stages=2, selected_stages=3)
    assert [CurriculumConfig(stages=3).selects(m) for m in range(3)] == [True] * 3
    assert [CurriculumConfig(stages=3, selected_stages=1).selects(m) for m in range(3)] == [True, False, False]
    assert (CurriculumConfig(stages=3).selecting_stages, CurriculumConfig(stages=3, selected_stages=1).selecting_stages) \
        == (3, 1)
    cfg = SelectionConfig(policy="cropi", ratio=0.1, guard=GuardConfig(source="check"), exclude_previous=True)
    assert stage_selection(cfg, True) is cfg
    whole = stage_selection(cfg, False)
    assert (whole.policy, whole.ratio, whole.guard.enabled, whole.exclude_previous) == ("full", 1.0, False, False)


def test_select_every_holds_each_selection_for_its_stages():
    from megatron_cropi.config.loader import ConfigError
    from megatron_cropi.curriculum.config import CurriculumConfig

    every = CurriculumConfig(stages=5, select_every=2)
    assert [every.held_from(m) for m in range(5)] == [None, 0, None, 2, None]
    assert every.scoring_stages() == [0, 2, 4] and every.scoring_stages(3) == [0, 2]
    warm = CurriculumConfig(stages=6, selected_stages=2, select_every=2)  # stage 0 selects, 1 holds, 2-5 the pool
    assert [warm.held_from(m) for m in range(6)] == [None, 0, None, None, None, None]
    assert warm.scoring_stages() == [0]
    three = CurriculumConfig(stages=7, selected_stages=5, select_every=3)
    assert [three.held_from(m) for m in range(7)] == [None, 0, 0, None, 3, None, None]
    assert CurriculumConfig(stages=3).scoring_stages() == [0, 1, 2]
    with pytest.raises(ConfigError, match="select_every.*4"):
        CurriculumConfig(stages=3, select_every=4)
    with pytest.raises(ConfigError, match="select_every.*0"):
        CurriculumConfig(stages=3, select_every=0)
    with pytest.raises(ConfigError, match="refresh_behaviour_every.*multiple of curriculum.select_every.*got 3"):
        CurriculumConfig(stages=6, select_every=2, refresh_behaviour_every=3)
    assert CurriculumConfig(stages=6, select_every=2, refresh_behaviour_every=4).held_from(4) is None


def test_select_every_refuses_a_shortlist(tmp_path):
    from megatron_cropi.config.loader import ConfigError
    from megatron_cropi.run_config import load_run_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("curriculum: {stages: 4, select_every: 2}\nscoring: {shortlist: {fraction: 0.5}}\n")
    with pytest.raises(ConfigError, match="curriculum.select_every.*shortlist"):
        load_run_config(cfg)
