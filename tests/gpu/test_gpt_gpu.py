"""GPU tier: the same provider and schedule on CUDA (NCCL), with the TE layer spec where installed.

Figures, not shapes: one random tiny HF Qwen2 is loaded into a local-spec and a Transformer Engine
``GPTModel`` on one GPU; in fp32 with TF32 off their logits must equal each other and HF transformers'
(relative max error ≤ 1e-4, the bound the CPU conversion tests hold), and the same holds in bf16 at a
bf16 bound (≤ 2e-2). A second check runs a bf16 forward + backward of a random provider-built model:
its cross-entropy is within 1 nat of ln V and its gradient finite and non-zero.
"""

import pytest
import torch

from megatron_cropi.testing.spawn import run_ranks

pytestmark = pytest.mark.gpu

SEQ, BATCH = 16, 2
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present without its CUDA extension
        return False
    return torch.cuda.is_available()


def _logits(hf_dir, spec, dtype, ids):
    """Full ``[B, S, V]`` fp32 logits (CPU) of ``hf_dir`` loaded into a ``spec`` GPTModel on this GPU."""
    from megatron_cropi.checkpoint import load_hf_into_model, model_config_from_hf
    from megatron_cropi.model.provider import build_gpt_model
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups

    g = build_parallel_groups(1, 1)
    try:
        cfg = model_config_from_hf(hf_dir, params_dtype=dtype, layer_spec=spec)
        model = build_gpt_model(cfg, g)
        load_hf_into_model(model, g, hf_dir)
        model.eval()
        tokens = ids.to(g.device)
        pos = torch.arange(SEQ, device=g.device).unsqueeze(0).expand(BATCH, SEQ)
        with torch.no_grad():
            out = model(input_ids=tokens, position_ids=pos, attention_mask=causal_attention_mask(SEQ, g.device))
        names = [n for n, _ in model.named_parameters()]
        return out.float().cpu(), names
    finally:
        destroy_parallel_groups()


def _specs_worker(hf_dir, ids, specs):
    from megatron_cropi.parallel import init_distributed

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backend = init_distributed()
    out = {"backend": backend}
    for spec in specs:
        for dtype in ("float32", "bfloat16"):
            out[(spec, dtype)] = _logits(hf_dir, spec, dtype, ids)
    return out


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_te_and_local_spec_logits_agree_with_hf_on_cuda(tmp_path):
    from megatron_cropi.testing.hf_tiny import hf_logits, save_tiny_hf_model

    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2", seed=3, hidden_size=64, num_heads=4, num_kv_heads=2,
                            intermediate_size=96, vocab_size=128, num_layers=2)
    ids = torch.randint(1, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    specs = ("local", "te") if _te_available() else ("local",)
    res = run_ranks(_specs_worker, 1, args=(str(hf), ids, specs), timeout_s=600, env=NO_TF32)[0]
    assert res.pop("backend") == "nccl"
    ref = hf_logits(hf, ids)
    errors = {key: _rel(logits, ref) for key, (logits, _) in res.items()}
    print("\nrelative max |logits - HF|:", {f"{s}/{d}": f"{e:.1e}" for (s, d), e in errors.items()})
    for (spec, dtype), err in errors.items():
        assert err <= (1e-4 if dtype == "float32" else 2e-2), (spec, dtype, err)
    if "te" in specs:
        te, te_names = res[("te", "float32")]
        local, local_names = res[("local", "float32")]
        assert _rel(te, local) <= 1e-4, _rel(te, local)
        # the model really is TE's: the pre-norms are fused into the linears
        assert any(n.endswith("linear_qkv.layer_norm_weight") for n in te_names)
        assert not any(n.endswith("layer_norm_weight") for n in local_names)
    else:
        pytest.skip("Transformer Engine not installed: only the local spec was compared with HF")


def _train_worker(layer_spec):
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    backend = init_distributed()
    groups = build_parallel_groups(1, 1)
    cfg = tiny_model_config(layer_spec=layer_spec, params_dtype="bfloat16")
    model = build_tiny_model(cfg, groups, seed=1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen).to(groups.device)
    pos = torch.arange(16, device=groups.device).unsqueeze(0).expand(2, 16)
    logits = model(input_ids=tokens, position_ids=pos, attention_mask=causal_attention_mask(16, groups.device))
    loss = torch.nn.functional.cross_entropy(logits.float()[:, :-1].reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = [p.grad if p.grad is not None else getattr(p, "main_grad", None) for p in model.parameters()]
    grad_norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None))
    return backend, str(logits.device), float(loss), float(grad_norm), tuple(logits.shape)


def test_bf16_forward_backward_on_cuda_gives_a_sane_loss_and_gradient():
    """A random model's cross-entropy is close to ln(V) and its gradient is finite and non-zero."""
    import math

    backend, device, loss, grad_norm, shape = run_ranks(_train_worker, 1, args=("local",), timeout_s=300)[0]
    assert backend == "nccl" and device.startswith("cuda") and shape == (2, 16, 128)
    assert abs(loss - math.log(128)) < 1.0, loss
    assert math.isfinite(grad_norm) and grad_norm > 0, grad_norm
