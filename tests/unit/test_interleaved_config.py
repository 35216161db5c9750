"""The interleaved (virtual pipeline) schedule: what the model config accepts, and what is refused by name.

POPI capture runs on model chunks (``tests/distributed/test_popi_capture_interleaved.py``), and so do
``cropi score`` and ``cropi select`` (``tests/distributed/test_cropi_select.py``); the other ``cropi``
commands (GRPO training, log-prob passes, the native sampler, checkpoint saving and export) run one
module per stage and refuse it at config load (hence in ``cropi run --dry-run``), the GRPO trainer and
the one-module model provider refuse it too.
"""

from types import SimpleNamespace

import pytest

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.run_config import RunConfig
from megatron_cropi.testing.tiny import tiny_model_config

VPP = {"num_layers": 4, "virtual_pipeline_model_parallel_size": 2}


def test_the_model_config_accepts_the_interleaved_schedule_where_capture_supports_it():
    cfg = tiny_model_config("tiny", transformer=VPP)
    assert cfg.virtual_pipeline_size == 2
    assert cfg.layout_errors(1, 2) == [] and cfg.layout_errors(2, 2) == []
    assert tiny_model_config("tiny").virtual_pipeline_size is None


@pytest.mark.parametrize("transformer,pp,message", [
    (VPP, 1, "virtual_pipeline_model_parallel_size=2 needs pipeline parallelism (PP > 1), got PP=1"),
    ({**VPP, "num_layers": 6}, 2, "num_layers=6 is not divisible by PP×V = 2×2"),
    ({**VPP, "virtual_pipeline_model_parallel_size": 1}, 2, "virtual_pipeline_model_parallel_size=1: must be an int >= 2"),
    ({**VPP, "batch_p2p_comm": True}, 2, "batch_p2p_comm true at PP=2"),
])
def test_model_layouts_the_interleaved_schedule_cannot_split_are_named(transformer, pp, message):
    errors = tiny_model_config("tiny", transformer=transformer).layout_errors(1, pp)
    assert any(message in e for e in errors), errors


def _vpp_config(tmp_path) -> str:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{output_dir: {tmp_path}/run}}\nparallel: {{pipeline_model_parallel_size: 2}}\n"
                   "model: {preset: tiny, transformer: {num_layers: 4, virtual_pipeline_model_parallel_size: 2}}\n")
    return str(cfg)


@pytest.mark.parametrize("command", ["run", "train", "rollout"])
def test_the_cropi_commands_that_train_sample_or_export_refuse_the_interleaved_schedule_by_name(tmp_path, command):
    from megatron_cropi.run_config import load_run_config

    with pytest.raises(ConfigError, match=f"supported by `cropi score` and `cropi select` only.*not by `cropi "
                                          f"{command}`.*GRPO training") as info:
        load_run_config(_vpp_config(tmp_path), command=command)
    assert info.value.key == "model.transformer.virtual_pipeline_model_parallel_size"
    with pytest.raises(ConfigError, match="not by `cropi run`"):  # the default: every caller but the scoring ones
        load_run_config(_vpp_config(tmp_path))
    # a layout error comes first, also by name
    with pytest.raises(ConfigError, match="needs pipeline parallelism"):
        from_dict(RunConfig, {"model": {"preset": "tiny", "transformer": VPP}})


@pytest.mark.parametrize("command", ["score", "select"])
def test_cropi_score_and_select_accept_the_interleaved_schedule(tmp_path, command):
    from megatron_cropi.run_config import load_run_config

    cfg = load_run_config(_vpp_config(tmp_path), command=command)
    assert cfg.model.virtual_pipeline_size == 2 and cfg.parallel.pipeline_model_parallel_size == 2
    cfg.refuse_interleaved_schedule(command)
    with pytest.raises(ConfigError, match="not by `cropi train`"):
        cfg.refuse_interleaved_schedule("train")


def test_the_dry_run_reports_the_refusal_by_name(tmp_path, capsys):
    from megatron_cropi.cli import main

    assert main(["run", "--dry-run", _vpp_config(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.transformer.virtual_pipeline_model_parallel_size: 2: the interleaved (virtual pipeline) " \
           "schedule is supported by `cropi score` and `cropi select` only" in err
    assert main(["select", "--print-config", _vpp_config(tmp_path), "--checkpoint", "x"]) == 0
    assert "virtual_pipeline_model_parallel_size: 2" in capsys.readouterr().out


def test_one_module_steps_refuse_a_chunked_model_by_name():
    """The provider without ``vp_stage`` (every caller but capture's chunk builder) and the GRPO trainer."""
    from megatron_cropi.grpo.config import GrpoConfig
    from megatron_cropi.grpo.trainer import GrpoTrainer
    from megatron_cropi.model.provider import build_gpt_model
    from megatron_cropi.parallel import build_parallel_groups, init_distributed

    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    cfg = tiny_model_config("tiny", transformer=VPP)
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size=2 needs pipeline parallelism"):
        build_gpt_model(cfg, groups)  # at PP=1 the layout is refused first
    # at PP=2 (one process cannot build those groups): the transformer config a PP=2 rank would build
    tcfg = SimpleNamespace(virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size=2: the interleaved schedule needs one "
                                         "model chunk per virtual stage"):
        build_gpt_model(cfg, groups, transformer_config=tcfg)
    with pytest.raises(ValueError, match="vp_stage=2 needs"):
        build_gpt_model(cfg, groups, transformer_config=tcfg, vp_stage=2)
    with pytest.raises(ValueError, match="GRPO training under the interleaved"):
        GrpoTrainer(GrpoConfig(), cfg, groups, model=None, engine=None, rewarder=None, sampling=None)


def test_the_schedule_wrapper_needs_every_chunk_of_an_interleaved_model():
    """One chunk of a V = 2 model (or a V-chunk list without one iterator each) would run the plain 1F1B
    schedule on half the layers: refused before megatron is called."""
    from megatron_cropi.model.schedule import forward_backward

    chunk = SimpleNamespace(config=SimpleNamespace(virtual_pipeline_model_parallel_size=2))
    groups = SimpleNamespace(pp_size=2)
    kw = dict(forward_step_func=None, num_microbatches=2, seq_length=4, micro_batch_size=1)
    with pytest.raises(ValueError, match="1 model chunk\\(s\\) with virtual_pipeline_model_parallel_size=2"):
        forward_backward(chunk, groups, data_iterator=iter([]), **kw)
    with pytest.raises(ValueError, match="one data iterator per chunk"):
        forward_backward([chunk, chunk], groups, data_iterator=iter([]), **kw)


def test_a_checkpoint_loads_only_weights_into_chunks():
    """``load_checkpoint`` on the interleaved schedule's chunks (scoring) refuses an optimizer or a reference
    model by name, before anything is read."""
    from megatron_cropi.checkpoint.dist_ckpt import load_checkpoint

    chunks = [SimpleNamespace(decoder=None), SimpleNamespace(decoder=None)]
    for extra in ({"optimizer": object()}, {"reference": object()}):
        with pytest.raises(ValueError, match="2 model chunks \\(interleaved schedule\\) take weights only"):
            load_checkpoint("/nonexistent", model=chunks, groups=None, **extra)
