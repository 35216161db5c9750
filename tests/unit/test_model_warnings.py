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

    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size=2: the interleaved"):
        from_dict(RunConfig, {"parallel": {"pipeline_model_parallel_size": 2},
                              "model": {"preset": "tiny", "transformer": {"virtual_pipeline_model_parallel_size": 2}}})
