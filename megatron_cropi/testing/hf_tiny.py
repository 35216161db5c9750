"""Tiny random HF Qwen2/Llama models saved to a local directory (no hub), for tests and benchmarks.

Every parameter is drawn at random (norm weights ``1 + N(0, 0.1²)``, biases and matrices
``N(0, std²)``) rather than HF's init (zero biases, unit norms), so a conversion that drops a bias or
swaps two norms changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["tiny_hf_config", "save_tiny_hf_model", "hf_logits"]


def tiny_hf_config(
    arch: str = "qwen2", *, tied: bool = False, vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2,
    num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None, intermediate_size: int = 96,
    rope_theta: float = 1e6, rms_norm_eps: float = 1e-6, max_position_embeddings: int = 64,
):
    """A transformers ``Qwen2Config`` (``arch="qwen2"``) or ``LlamaConfig`` (``"llama"``)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps, tie_word_embeddings=tied,
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
    )
    if head_dim is not None:
        common["head_dim"] = head_dim
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")


@torch.no_grad()
def save_tiny_hf_model(out_dir: str | Path, arch: str = "qwen2", *, seed: int = 0, std: float = 0.05,
                       dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    """Build a random tiny ``*ForCausalLM``, ``save_pretrained`` it (safetensors) to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if ("norm" in name and name.endswith("weight")) else std * noise)
    model.save_pretrained(out_dir)
    return Path(out_dir)


@torch.no_grad()
def hf_logits(hf_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """HF transformers' float32 logits ``[B, S, V]`` of a local model for ``input_ids`` ``[B, S]``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model(input_ids=input_ids).logits.float()
