"""GPU tier: POPI capture on CUDA with the Transformer Engine layer spec and under TP/PP on NCCL.

* TE vs local spec: the same HF Qwen2 weights loaded into a TE-spec and a local-spec ``GPTModel``
  give the same projected per-prompt gradients (fp32, TF32 off: relative error ≤ 1e-5). With TE,
  ``scoring.mode: per_prompt`` is the mode to use: :class:`~megatron_cropi.popi.hooks.PerPromptTap`
  hooks each parameter's ``AccumulateGrad`` (``register_post_accumulate_grad_hook``), which does not
  depend on the module type, while ``BatchedTap`` only sees megatron-core's local modules
  (Column/RowParallelLinear, torch norms) and must refuse a TE model. This test checks both claims.
* TP=2 and PP=2 on NCCL (two GPUs; skipped otherwise) equal TP=1/PP=1, for the local spec in both
  capture modes and for TE in per_prompt mode.

TE fuses the pre-attention and pre-MLP norms into ``linear_qkv`` / ``linear_fc1``
(``...layer_norm_weight``), so those two parameters carry other global names than the local spec's
``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``, and the projector (keyed by global name)
would give them other columns. :class:`CanonicalNames` maps them to the local names so the two specs'
sketches are comparable; the run itself only ever compares sketches made with one spec.
"""

import dataclasses

import numpy as np
import pytest
import torch

from megatron_cropi.testing.spawn import run_ranks

pytestmark = pytest.mark.gpu

K, G, PROMPT, RESP = 4, 5, 5, 7
SEQ = PROMPT + RESP
TE_TO_LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}  # cuBLAS/cuDNN (TE's GEMMs included) compute fp32 in fp32


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present without its CUDA extension
        return False
    return torch.cuda.is_available()


class CanonicalNames:
    """A projector that projects TE's fused-norm parameters under the local spec's global names."""

    def __init__(self, inner):
        self.inner, self.k = inner, inner.k

    def project(self, shard, spec):
        name = spec.global_name
        for te, local in TE_TO_LOCAL.items():
            name = name.replace(te, local)
        return self.inner.project(shard, dataclasses.replace(spec, global_name=name))


def _groups_data(vocab: int, seed: int = 0):
    """G prompts with K responses each; mixed rewards (every group has a gradient)."""
    from megatron_cropi.records import PromptRecord, Response, RolloutGroup

    rng = np.random.default_rng(seed)
    out = []
    for i in range(G):
        prompt = PromptRecord(prompt_id=f"p{i}", token_ids=rng.integers(1, vocab, PROMPT).astype(np.int32), answer="")
        responses = tuple(
            Response(rng.integers(1, vocab, n).astype(np.int32), (-rng.uniform(3.0, 6.0, n)).astype(np.float32))
            for n in rng.integers(2, RESP + 1, K))
        rewards = np.array([1, 0, 0, 1] if i % 2 else [0, 1, 1, 1], dtype=np.float32)
        out.append(RolloutGroup(prompt, responses, rewards))
    return out


def _capture(hf_dir, spec, tp, pp, mode):
    """``[G, k]`` sketches of the POPI gradients of ``_groups_data`` (every rank), and the parameter names."""
    from megatron_cropi.checkpoint import load_hf_into_model, model_config_from_hf
    from megatron_cropi.model.provider import build_gpt_model
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups
    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.popi.capture import PopiCapture
    from megatron_cropi.popi.loss import PopiLossConfig
    from megatron_cropi.projection import ProjectionConfig, build_projector

    g = build_parallel_groups(tp, pp)
    try:
        cfg = model_config_from_hf(hf_dir, params_dtype="float32", layer_spec=spec)
        model = build_gpt_model(cfg, g)
        load_hf_into_model(model, g, hf_dir)
        projector = CanonicalNames(build_projector(ProjectionConfig(kind="sjlt", k=512, keep_ratio=0.5, seed=3)))
        data = _groups_data(cfg.vocab_size)
        ppm = 1 if mode == "per_prompt" else 2
        mbs = pack_microbatches(data, list(range(G)), prompts_per_microbatch=ppm, responses_per_prompt=K,
                                seq_length=SEQ)
        out = PopiCapture(model, g, projector, mode=mode, loss_cfg=PopiLossConfig(clip_eps=None)).run(mbs, G, K)
        assert all(p.grad is None for p in model.parameters())  # nothing held after the capture
        return out.sketches, out.finite, [n for n, _ in model.named_parameters()]
    finally:
        destroy_parallel_groups()


def _te_vs_local_worker(hf_dir):
    from megatron_cropi.parallel import init_distributed
    from megatron_cropi.popi.hooks import UnsupportedParameterError

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backend = init_distributed()
    res = {"backend": backend}
    res["local_per_prompt"] = _capture(hf_dir, "local", 1, 1, "per_prompt")
    res["local_batched"] = _capture(hf_dir, "local", 1, 1, "batched")
    res["te_per_prompt"] = _capture(hf_dir, "te", 1, 1, "per_prompt")
    try:
        _capture(hf_dir, "te", 1, 1, "batched")
        res["te_batched"] = "no error"
    except UnsupportedParameterError as err:
        res["te_batched"] = str(err)
    return res


def _rel(a, b) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def test_te_and_local_specs_capture_the_same_sketches(tmp_path):
    if not _te_available():
        pytest.skip("needs Transformer Engine with its CUDA extension")
    from megatron_cropi.testing.hf_tiny import save_tiny_hf_model

    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2", seed=1, hidden_size=64, num_heads=4, num_kv_heads=2,
                            intermediate_size=96, vocab_size=128, num_layers=2)
    res = run_ranks(_te_vs_local_worker, 1, args=(str(hf),), timeout_s=600, env=NO_TF32)[0]
    assert res["backend"] == "nccl"
    ref, ref_finite, local_names = res["local_per_prompt"]
    assert ref_finite.all() and (ref.norm(dim=1) > 0).all()
    sk, finite, te_names = res["te_per_prompt"]
    # the model really is TE's: the norms are fused into the linears
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in te_names)
    assert not any(n.endswith("layer_norm_weight") for n in local_names)
    assert finite.all() and _rel(sk, ref) <= 1e-5, _rel(sk, ref)
    assert _rel(res["local_batched"][0], ref) <= 1e-5
    # batched capture refuses TE modules by name instead of scoring them wrongly
    assert "use scoring.mode: per_prompt" in res["te_batched"]


def _tp_pp_worker(hf_dir, specs):
    import torch.distributed as dist

    from megatron_cropi.parallel import init_distributed

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backend = init_distributed()
    out = {"backend": backend}
    for spec in specs:
        modes = ("per_prompt", "batched") if spec == "local" else ("per_prompt",)
        for mode in modes:
            # TP=1/PP=1 on two ranks is DP=2: both replicas capture the same prompts
            for tp, pp in ((1, 1), (2, 1), (1, 2)):
                out[(spec, mode, tp, pp)] = _capture(hf_dir, spec, tp, pp, mode)[:2]
    return out if dist.get_rank() == 0 else None


def test_capture_under_tp_and_pp_on_nccl_equals_one_gpu(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from megatron_cropi.testing.hf_tiny import save_tiny_hf_model

    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2", seed=2, tied=True, hidden_size=64, num_heads=4,
                            num_kv_heads=2, intermediate_size=96, vocab_size=128, num_layers=2)
    specs = ("local", "te") if _te_available() else ("local",)
    res = run_ranks(_tp_pp_worker, 2, args=(str(hf), specs), timeout_s=600, env=NO_TF32)[0]
    assert res.pop("backend") == "nccl"
    for (spec, mode, tp, pp), (sk, finite) in res.items():
        ref, _ = res[(spec, mode, 1, 1)]
        assert finite.all() and (ref.norm(dim=1) > 0).all()
        assert _rel(sk, ref) <= 1e-5, (spec, mode, tp, pp, _rel(sk, ref))
    # and the two capture modes agree with each other
    assert _rel(res[("local", "batched", 2, 1)][0], res[("local", "per_prompt", 1, 1)][0]) <= 1e-5
