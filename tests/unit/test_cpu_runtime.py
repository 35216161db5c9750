"""The CPU runtime redirects Megatron's CUDA hard-codes; a tiny GPTModel runs fwd+bwd in-process."""

import pytest
import torch

from megatron_cropi.cpu_runtime import apply_cpu_runtime, cpu_runtime_active

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is a no-op with CUDA")


def test_cuda_literals_land_on_cpu():
    assert apply_cpu_runtime() is True and cpu_runtime_active()
    assert apply_cpu_runtime() is True  # idempotent
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).to(torch.float64).dtype == torch.float64  # dtype-only .to() untouched
    assert torch.cuda.current_device().type == "cpu"


def test_megatron_default_mask_and_rng_tracker():
    apply_cpu_runtime()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(5)
    assert mask.device.type == "cpu" and mask.shape == (5, 5) and bool(mask[0, 1]) and not bool(mask[1, 0])
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("cropi-test", 123)
    with tracker.fork("cropi-test"):
        a = torch.rand(3)
    with tracker.fork("cropi-test"):
        b = torch.rand(3)
    assert not torch.equal(a, b)  # successive forks advance the tracked stream


def test_tiny_gpt_forward_backward_single_process():
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    cfg = tiny_model_config()
    model = build_tiny_model(cfg, groups, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    pos = torch.arange(8).unsqueeze(0).expand(2, 8)
    logits = model(input_ids=tokens, position_ids=pos, attention_mask=causal_attention_mask(8, groups.device))
    assert logits.shape == (2, 8, cfg.vocab_size) and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # causality: changing a later token leaves earlier logits unchanged
    tokens2 = tokens.clone()
    tokens2[:, -1] = (tokens2[:, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        logits2 = model(input_ids=tokens2, position_ids=pos, attention_mask=causal_attention_mask(8, groups.device))
    assert torch.allclose(logits[:, :-1].detach(), logits2[:, :-1], atol=1e-6)
