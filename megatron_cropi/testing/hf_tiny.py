"""Tiny random HF Qwen2/Qwen3/Llama models saved to a local directory (no hub), for tests and benchmarks.

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
    """A transformers ``Qwen2Config`` (``arch="qwen2"``), ``Qwen3Config`` (``"qwen3"``) or ``LlamaConfig``."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

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
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"arch must be 'qwen2', 'qwen3' or 'llama', got {arch!r}")


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


# config.json of Qwen/Qwen2.5-1.5B-Instruct and Qwen/Qwen2.5-7B-Instruct (transformers 4.x style), for
# tests that check presets, conversion and dry runs against the real architectures without weights.
QWEN25_1_5B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN25_7B_CONFIG = dict(QWEN25_1_5B_CONFIG, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064, max_window_layers=28)

# config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-8B (transformers 4.51 style): q/k norms, head_dim 128.
QWEN3_1_7B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_8B_CONFIG = dict(QWEN3_1_7B_CONFIG, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                       num_hidden_layers=36, max_window_layers=36, tie_word_embeddings=False)
