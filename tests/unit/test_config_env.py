"""Environment references in YAML string values: ${VAR} and ${VAR:-default}."""

import pytest

from megatron_cropi.config.loader import ConfigError, expand_env, load_yaml
from megatron_cropi.run_config import load_run_config


def test_expansion_of_set_unset_default_and_escaped_references():
    env = {"DATA_DIR": "/data", "EMPTY": ""}
    data = {"a": "${DATA_DIR}/x.parquet", "b": ["${OUT:-runs/default}", {"c": "${EMPTY:-fallback}"}],
            "d": "$${DATA_DIR} stays", "e": 3, "f": "${DATA_DIR}${DATA_DIR}", "g": "${EMPTY}"}
    assert expand_env(data, env) == {"a": "/data/x.parquet", "b": ["runs/default", {"c": "fallback"}],
                                     "d": "${DATA_DIR} stays", "e": 3, "f": "/data/data", "g": ""}


def test_unset_variable_names_key_path_and_variable():
    with pytest.raises(ConfigError) as info:
        expand_env({"data": {"pool": [{"path": "ok"}, {"path": "${DATA_DIR}/gsm8k.parquet"}]}}, {})
    assert info.value.key == "data.pool[1].path"
    assert "DATA_DIR is not set" in str(info.value)


def test_malformed_reference_is_an_error():
    with pytest.raises(ConfigError, match="not a variable reference") as info:
        expand_env({"run": {"output_dir": "${1BAD}"}}, {})
    assert info.value.key == "run.output_dir"


def test_load_yaml_and_run_config_expand_from_the_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {output_dir: '${CROPI_TEST_OUT}/run', seed: 7}\n")
    assert load_yaml(cfg, {"CROPI_TEST_OUT": "/o"})["run"] == {"output_dir": "/o/run", "seed": 7}
    monkeypatch.setenv("CROPI_TEST_OUT", str(tmp_path))
    assert load_run_config(cfg).run.output_dir == f"{tmp_path}/run"
    monkeypatch.delenv("CROPI_TEST_OUT")
    with pytest.raises(ConfigError) as info:
        load_run_config(cfg)
    assert info.value.key == "run.output_dir" and "CROPI_TEST_OUT" in str(info.value) and str(cfg) in str(info.value)
