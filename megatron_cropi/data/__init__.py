"""Prompts: file loaders (GSM8K, MATH, DeepScaleR), stable prompt ids and de-duplication, tokenizers
(HF with chat template; the synthetic suite's 32-id characters), and the synthetic task suite."""

from megatron_cropi.data.char_tokenizer import CharTokenizer
from megatron_cropi.data.config import DataConfig, DatasetFile, SyntheticConfig
from megatron_cropi.data.loaders import DataError, load_dataset_file, read_rows
from megatron_cropi.data.prompt_ids import dedup_prompts, pool_hash, prompt_id
from megatron_cropi.data.prompts import PromptSet, build_tokenizer, load_prompt_set
from megatron_cropi.data.tokenizer import HFTokenizer, TextTokenizer

__all__ = [
    "CharTokenizer", "DataConfig", "DatasetFile", "SyntheticConfig", "DataError", "load_dataset_file", "read_rows",
    "dedup_prompts", "pool_hash", "prompt_id", "PromptSet", "build_tokenizer", "load_prompt_set", "HFTokenizer",
    "TextTokenizer",
]
