"""Checkpoint conversion between HF transformers directories and Megatron ``GPTModel`` shards.

* :mod:`.hf_config`: HF config.json ↔ :class:`ModelConfig` / :class:`GPTDimensions` (Qwen2, Llama).
* :mod:`.hf_mapping`: pure name/layout mapping, HF Qwen2/Llama tensors ↔ global Megatron tensors.
* :mod:`.hf_io`: reading/writing HF directories (config.json + safetensors, sharded or not).
* :mod:`.hf`: load into / save from a live TP/PP-sharded model; HF-named weights for vLLM.
"""

from megatron_cropi.checkpoint.hf import (
    check_checkpoint_matches,
    iter_global_tensors,
    load_hf_into_model,
    megatron_to_hf_named_tensors,
    model_config_from_hf,
    save_model_as_hf,
    uses_fused_norm_names,
)
from megatron_cropi.checkpoint.hf_io import HFCheckpointReader, HFCheckpointWriter, read_hf_config
from megatron_cropi.checkpoint.hf_config import (
    SUPPORTED_ARCHITECTURES,
    GPTDimensions,
    HFCheckpointError,
    model_config_from_hf_config,
)
from megatron_cropi.checkpoint.hf_mapping import hf_to_megatron_global, megatron_global_to_hf

__all__ = [
    "HFCheckpointError",
    "SUPPORTED_ARCHITECTURES",
    "GPTDimensions",
    "HFCheckpointReader",
    "HFCheckpointWriter",
    "read_hf_config",
    "model_config_from_hf",
    "model_config_from_hf_config",
    "hf_to_megatron_global",
    "megatron_global_to_hf",
    "uses_fused_norm_names",
    "check_checkpoint_matches",
    "load_hf_into_model",
    "iter_global_tensors",
    "megatron_to_hf_named_tensors",
    "save_model_as_hf",
]
