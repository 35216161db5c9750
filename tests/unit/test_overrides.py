"""Command-line overrides, ``--print-config`` and ``extends:`` between config files."""

import textwrap

import pytest
import yaml

from megatron_cropi.cli import main
from megatron_cropi.config.compose import apply_override, compose_config, deep_merge, parse_override
from megatron_cropi.config.loader import ConfigError
from megatron_cropi.run_config import config_to_yaml, load_run_config

TINY = "examples/configs/tiny_cpu.yaml"


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_an_override_changes_the_config():
    base = load_run_config(TINY)
    cfg = load_run_config(TINY, ["grpo.optim.lr=3e-4", "selection.pass_rate_band=[0.1, 0.9]",
                                 "model.transformer.num_layers=3", "curriculum.plot=false", "run.output_dir=/tmp/x"])
    assert cfg.grpo.optim.lr == 3e-4 and cfg.selection.pass_rate_band == (0.1, 0.9)
    assert cfg.model.transformer["num_layers"] == 3 and cfg.curriculum.plot is False
    assert cfg.run.output_dir == "/tmp/x"
    assert cfg.grpo.steps == base.grpo.steps and cfg.model.transformer["hidden_size"] == base.model.transformer["hidden_size"]


@pytest.mark.parametrize("override, key, fragment", [
    ("grpo.optim.lrr=1", "grpo.optim.lrr", "unknown key"),
    ("nosuch.key=1", "nosuch", "unknown key"),
    ("grpo.steps=many", "grpo.steps", "'many'"),
    ("run.seed=-1", "run.seed", "-1"),
    ("grpo=3", "grpo", "expected a mapping"),
    ("selection.policy=best", "selection.policy", "'best'"),
])
def test_a_bad_override_names_its_key_value_and_itself(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_run_config(TINY, [override])
    assert info.value.key == key and fragment in str(info.value)
    assert f"command-line override {override!r}" in str(info.value)


def test_override_syntax():
    assert parse_override("a.b=1e-6") == ("a.b", "1e-6")  # YAML 1.1 string; the loader makes it a float
    assert parse_override("a.b=") == ("a.b", "")
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a.b={path: x.jsonl, limit: 3}") == ("a.b", {"path": "x.jsonl", "limit": 3})
    assert parse_override("a=x=y") == ("a", "x=y")
    for bad in ("novalue", "=3", "a..b=1", "extends=x.yaml"):
        with pytest.raises(ConfigError):
            parse_override(bad)
    tree = {"data": {"pool": [{"path": "a.jsonl"}, {"path": "b.jsonl"}]}}
    out = apply_override(tree, "data.pool[1].limit", 5)
    assert out["data"]["pool"][1] == {"path": "b.jsonl", "limit": 5}
    assert tree["data"]["pool"][1] == {"path": "b.jsonl"}  # the input is left alone
    with pytest.raises(ConfigError, match="no such list item") as info:
        apply_override(tree, "data.pool[2].path", "c.jsonl")
    assert info.value.key == "data.pool[2]"
    with pytest.raises(ConfigError) as info:
        apply_override(tree, "data.pool.path", "c.jsonl")
    assert info.value.key == "data.pool.path"


def test_an_override_of_a_list_item_is_validated(tmp_path):
    cfg = _write(tmp_path / "c.yaml", """\
        data: {kind: files, tokenizer: /tok, pool: [{path: a.jsonl, format: math}]}
    """)
    assert load_run_config(cfg, ["data.pool[0].limit=7"]).data.pool[0].limit == 7
    with pytest.raises(ConfigError) as info:
        load_run_config(cfg, ["data.pool[0].path=a.csv"])
    assert info.value.key == "data.pool[0].path" and "'a.csv'" in str(info.value)


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["run", TINY, "grpo.steps=7", "--print-config", "selection.ratio=0.2"]) == 0
    text = capsys.readouterr().out
    printed = _write(tmp_path / "printed.yaml", text)
    again = load_run_config(printed)
    assert again == load_run_config(TINY, ["grpo.steps=7", "selection.ratio=0.2"])
    assert yaml.safe_load(text)["grpo"]["steps"] == 7
    assert config_to_yaml(again) == text


def test_every_config_subcommand_takes_overrides_and_print_config(capsys):
    for command in ("run", "rollout", "train", "score"):
        assert main([command, TINY, "rollout.n=3", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["rollout"]["n"] == 3


def test_cli_bad_override_exits_2_naming_the_key(capsys):
    assert main(["run", "--dry-run", TINY, "grpo.optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "grpo.optim.lrr" in err and "unknown key" in err


def test_cli_override_reaches_the_dry_run(tmp_path, capsys):
    assert main(["run", TINY, "--dry-run", f"run.output_dir={tmp_path}/o", "parallel.tensor_model_parallel_size=2",
                 "curriculum.background_scoring=false", "--world-size", "3"]) == 2
    assert "world size 3 is not divisible by TP×PP = 2×1" in capsys.readouterr().err


def test_extends_chains_deep_merges_and_replaces_lists(tmp_path):
    _write(tmp_path / "root.yaml", """\
        run: {seed: 5, output_dir: runs/root}
        selection: {ratio: 0.3, pass_rate_band: [0.1, 0.9]}
        grpo: {steps: 10, optim: {lr: 1.0e-5, clip_grad: 2.0}}
    """)
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "mid.yaml", """\
        extends: ../root.yaml
        grpo: {optim: {lr: 2.0e-5}}
        selection: {pass_rate_band: [0.3, 0.7]}
    """)
    leaf = _write(tmp_path / "sub" / "leaf.yaml", """\
        extends: mid.yaml          # relative to this file
        run: {output_dir: runs/leaf}
    """)
    cfg = load_run_config(leaf)
    assert (cfg.run.seed, cfg.run.output_dir) == (5, "runs/leaf")
    assert (cfg.grpo.steps, cfg.grpo.optim.lr, cfg.grpo.optim.clip_grad) == (10, 2e-5, 2.0)
    assert (cfg.selection.ratio, cfg.selection.pass_rate_band) == (0.3, (0.3, 0.7))
    tree = compose_config(leaf)
    assert tree.files == [str(leaf), str(tmp_path / "sub" / "mid.yaml"), str(tmp_path / "sub" / "../root.yaml")]
    assert tree.origin("run.seed").endswith("root.yaml") and tree.origin("run.output_dir").endswith("leaf.yaml")
    assert deep_merge({"a": {"b": 1, "c": [1, 2]}}, {"a": {"c": [3]}}) == {"a": {"b": 1, "c": [3]}}


def test_an_error_names_the_file_that_set_the_value(tmp_path):
    _write(tmp_path / "base.yaml", "grpo: {steps: lots}\n")
    leaf = _write(tmp_path / "leaf.yaml", "extends: base.yaml\nrun: {seed: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(leaf)
    assert info.value.key == "grpo.steps" and "base.yaml" in str(info.value) and "leaf.yaml" not in str(info.value)


def test_extends_cycles_and_missing_bases_name_the_files(tmp_path):
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends cycle") as info:
        load_run_config(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(info.value) and "b.yaml -> " in str(info.value)
    _write(tmp_path / "c.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*does not exist") as info:
        load_run_config(tmp_path / "c.yaml")
    assert info.value.key == "extends" and "c.yaml" in str(info.value)
    _write(tmp_path / "d.yaml", "extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="path of a YAML file"):
        load_run_config(tmp_path / "d.yaml")


def test_environment_references_resolve_after_merging(tmp_path):
    _write(tmp_path / "base.yaml", "run: {output_dir: '${CROPI_UNSET_DIR}/run'}\n")
    leaf = _write(tmp_path / "leaf.yaml", "extends: base.yaml\nrun: {output_dir: runs/here}\n")
    assert load_run_config(leaf, environ={}).run.output_dir == "runs/here"
    with pytest.raises(ConfigError, match="CROPI_UNSET_DIR is not set") as info:
        load_run_config(tmp_path / "base.yaml", environ={})
    assert "base.yaml" in str(info.value)
