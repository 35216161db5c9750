"""Building the CPU default model says nothing about deprecated megatron-core options we set."""

import warnings

import pytest


@pytest.mark.parametrize("preset", ["cpu-default", "tiny"])
def test_building_the_model_emits_no_cuda_graph_scope_deprecation(preset):
    from megatron_cropi.model.provider import build_transformer_config
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    cfg = tiny_model_config(preset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tc = build_transformer_config(cfg, groups)
        build_tiny_model(cfg, groups)
    about_scope = [w for w in caught if issubclass(w.category, (DeprecationWarning, UserWarning))
                   and ("scope" in str(w.message) or "cuda_graph" in str(w.message))]
    assert not about_scope, [str(w.message) for w in about_scope]
    assert tc.cuda_graph_scope == []  # what megatron-core turned the old default "full" into: same behaviour


def test_the_interleaved_schedule_is_refused_by_name():
    import pytest

    from megatron_cropi.config.loader import ConfigError, from_dict
    from megatron_cropi.run_config import RunConfig

    # the cropi commands but score and select run one model chunk per stage (test_interleaved_config.py)
    cfg = from_dict(RunConfig, {"parallel": {"pipeline_model_parallel_size": 2},
                                "model": {"preset": "tiny", "transformer": {"num_layers": 4,
                                                                            "virtual_pipeline_model_parallel_size": 2}}})
    cfg.refuse_interleaved_schedule("select")
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size: 2: the interleaved"):
        cfg.refuse_interleaved_schedule("run")


def test_sequence_parallel_is_allowed_where_it_is_tested_and_refused_by_name_elsewhere():
    """SP: the local spec at TP > 1 with the vLLM engine loads (capture and GRPO are checked against
    TP = 1 in tests/distributed/test_popi_capture_sp.py and test_grpo_sp.py); TP = 1, the TE or auto
    spec, the native sampler and the warm-up are refused naming the key."""
    from megatron_cropi.config.loader import ConfigError, from_dict
    from megatron_cropi.run_config import RunConfig

    sp = {"preset": "tiny", "layer_spec": "local", "transformer": {"sequence_parallel": True}}
    vllm = {"engine": "vllm", "checkpoint": "/m"}
    tp2 = {"tensor_model_parallel_size": 2}
    cfg = from_dict(RunConfig, {"parallel": tp2, "model": sp, "rollout": vllm, "scoring": {"mode": "batched"}})
    assert cfg.model.transformer["sequence_parallel"] and not cfg.model.layout_errors(2, 2)
    with pytest.raises(ConfigError, match="sequence_parallel needs TP > 1, got TP=1"):
        from_dict(RunConfig, {"model": sp, "rollout": vllm})
    for spec in ("te", "auto"):
        with pytest.raises(ConfigError, match=f"sequence_parallel with model.layer_spec '{spec}'.*local spec only"):
            from_dict(RunConfig, {"parallel": tp2, "model": {**sp, "layer_spec": spec}, "rollout": vllm})
    with pytest.raises(ConfigError, match="rollout.engine native") as info:
        from_dict(RunConfig, {"parallel": tp2, "model": sp})
    assert info.value.key == "model.transformer.sequence_parallel"
    with pytest.raises(ConfigError, match="curriculum.warmup.enabled") as info:
        from_dict(RunConfig, {"parallel": tp2, "model": sp, "rollout": vllm, "curriculum": {"warmup": {"enabled": True}}})
    assert info.value.key == "model.transformer.sequence_parallel"


def test_sequence_parallel_model_builds_on_the_local_spec_only():
    """At model build (every command): megatron's WrappedTorchNorm would assert; ours builds, and a
    TE/auto spec under SP is refused with the same message as the config."""
    from megatron_cropi.model.provider import SequenceParallelTorchNorm, build_layer_spec
    from megatron_cropi.testing.tiny import tiny_model_config

    cfg = tiny_model_config("tiny-qwen3", layer_spec="local", transformer={"sequence_parallel": True})
    spec = build_layer_spec(cfg)
    sub = spec.submodules
    assert sub.input_layernorm is SequenceParallelTorchNorm and sub.pre_mlp_layernorm is SequenceParallelTorchNorm
    assert sub.self_attention.submodules.q_layernorm is SequenceParallelTorchNorm
    assert "TP > 1" in " ".join(cfg.layout_errors(1, 1))
    auto = tiny_model_config("tiny", transformer={"sequence_parallel": True})
    assert any("layer_spec 'auto'" in e for e in auto.layout_errors(2, 1))
