"""GPU tier: the same provider and schedule on CUDA (NCCL), with the TE layer spec where installed."""

import pytest
import torch

from megatron_cropi.testing.spawn import run_ranks

pytestmark = pytest.mark.gpu


def _gpu_worker(layer_spec):
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    backend = init_distributed()
    groups = build_parallel_groups(1, 1)
    cfg = tiny_model_config(layer_spec=layer_spec, params_dtype="bfloat16")
    model = build_tiny_model(cfg, groups, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), device=groups.device)
    pos = torch.arange(16, device=groups.device).unsqueeze(0).expand(2, 16)
    logits = model(input_ids=tokens, position_ids=pos, attention_mask=causal_attention_mask(16, groups.device))
    logits.float().logsumexp(-1).mean().backward()
    names = [n for n, _ in model.named_parameters()]
    return backend, logits.shape, str(logits.device), names


@pytest.mark.parametrize("layer_spec", ["local", "te"])
def test_tiny_gpt_on_cuda(layer_spec):
    if layer_spec == "te":
        pytest.importorskip("transformer_engine.pytorch")
    backend, shape, device, names = run_ranks(_gpu_worker, 1, args=(layer_spec,), timeout_s=300)[0]
    assert backend == "nccl" and device.startswith("cuda")
    assert tuple(shape) == (2, 16, 128)
    if layer_spec == "te":  # TE fuses the pre-norms into the linears
        assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names)
