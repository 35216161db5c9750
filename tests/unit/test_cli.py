"""The ``cropi`` command: check-env and run --dry-run."""

import json

from megatron_cropi.cli import main


def test_dry_run_of_the_cpu_default(capsys):
    assert main(["run", "--dry-run", "examples/configs/tiny_cpu.yaml"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert summary["model"]["parameters"] > 100_000
    assert "dry run OK" in out


def test_dry_run_reports_bad_world_size_and_paths(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{output_dir: {blocker}/sub}}\nparallel: {{tensor_model_parallel_size: 2}}\n")
    assert main(["run", "--dry-run", str(cfg), "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "world size 3 is not divisible by TP×PP = 2×1" in err
    assert "run.output_dir" in err


def test_config_error_exits_2_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: tiny, vocab_size: many}\n")
    assert main(["run", "--dry-run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size" in err and "'many'" in err


def test_check_env_json(capsys):
    assert main(["check-env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"].startswith("2.")
    assert info["packages"]["megatron-core"]
    assert info["backends"]["gloo"] is True
    assert info["backends"]["layer_spec"] in ("local", "te")
