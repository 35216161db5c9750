"""`cropi select` without a model: argument parsing, output names, the behaviour stores it looks up."""

import json

import pytest


def test_select_subcommand_parses_checkpoint_out_stage_and_overrides():
    from megatron_cropi.cli import build_parser

    args = build_parser().parse_args(["select", "c.yaml", "selection.ratio=0.2", "--checkpoint", "ck", "--out", "o",
                                      "--stage", "2"])
    assert (args.config, args.checkpoint, args.out, args.stage, args.overrides) == ("c.yaml", "ck", "o", 2,
                                                                                   ["selection.ratio=0.2"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["select", "c.yaml"])  # --checkpoint is required


def test_checkpoint_tag_and_refusal(tmp_path):
    from megatron_cropi.commands.select import checkpoint_tag
    from megatron_cropi.wiring import RunInputError

    (tmp_path / "step_00000006").mkdir()
    (tmp_path / "step_00000006" / "meta.json").write_text("{}")
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text("{}")
    assert checkpoint_tag(tmp_path / "step_00000006") == "step_00000006"
    assert checkpoint_tag(tmp_path / "policy") == "hf-policy"
    with pytest.raises(RunInputError, match="neither a GRPO checkpoint"):
        checkpoint_tag(tmp_path)


def test_missing_behaviour_stores_name_the_store_and_the_command(tmp_path):
    from megatron_cropi.commands.select import behaviour_stores
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.run_config import load_run_config
    from megatron_cropi.wiring import RunInputError

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps({"run": {"output_dir": str(tmp_path / "run")}}))
    cfg = load_run_config(str(cfg_path), ())
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(RunInputError, match=r"pool .*target-add3c .*cropi run"):
        behaviour_stores(cfg, layout, ["add3c"])
    for name in ("pool", "val"):  # cropi rollout --split pool / --split val
        (layout.rollouts(name)).mkdir(parents=True)
        (layout.rollouts(name) / "manifest.json").write_text("{}")
    assert behaviour_stores(cfg, layout, ["add3c"]) == {"pool": layout.rollouts("pool"),
                                                         "target-add3c": layout.rollouts("val")}
