"""External trainer stages without a run: ``curriculum.trainer`` validation (errors name key and value)
and the check of the HF checkpoint a stage's command leaves (config, tensors, finite)."""

import pytest
import torch

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.curriculum.config import CurriculumConfig


def test_trainer_config_external_validation():
    c = from_dict(CurriculumConfig, {"trainer": {"kind": "external", "command": "t {selection_parquet} {checkpoint_out}"}})
    assert c.trainer.checkpoint_dir("/o", 1) == "/o/external/stage1/hf"
    c = from_dict(CurriculumConfig, {"trainer": {"kind": "external", "command": "t {checkpoint_out}",
                                                 "checkpoint_out": "/ck/{stage}"}})
    assert c.trainer.checkpoint_dir("/o", 3) == "/ck/3"
    bad = [({"kind": "external"}, "a shell command"),
           ({"kind": "external", "command": "t {ckpt} {checkpoint_out}"}, r"unknown: \['ckpt'\]"),
           ({"kind": "external", "command": "t {checkpoint_in}"}, "must name {checkpoint_out}"),
           ({"kind": "external", "command": "t {checkpoint_out}", "checkpoint_out": "/ck"}, "must name {stage}"),
           ({"command": "t {checkpoint_out}"}, "only read with kind: external"),
           ({"kind": "elsewhere"}, "trainer.kind: expected one of")]
    for trainer, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict(CurriculumConfig, {"trainer": trainer})


def test_external_checkpoint_check_names_what_is_wrong(tmp_path):
    from megatron_cropi.checkpoint import model_config_from_hf
    from megatron_cropi.curriculum.external import hf_checkpoint_problem
    from megatron_cropi.testing.hf_tiny import save_tiny_hf_model
    from safetensors.torch import load_file, save_file

    hf = save_tiny_hf_model(tmp_path / "hf")
    cfg = model_config_from_hf(hf)
    assert "config.json does not exist" in hf_checkpoint_problem(tmp_path / "none", cfg)
    assert hf_checkpoint_problem(hf, cfg) is None
    other = model_config_from_hf(save_tiny_hf_model(tmp_path / "hf3", num_layers=3))
    assert "does not match the model" in hf_checkpoint_problem(hf, other)
    shard = next(hf.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = torch.inf
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert f"tensor {name!r} has 1 non-finite values" == hf_checkpoint_problem(hf, cfg)
