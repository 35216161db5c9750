"""Rollouts: records, engines (vLLM, native Megatron sampler), and the trajectory store.

* :mod:`.types`: ``PromptRecord``, ``SamplingParams``, ``Response``, ``RolloutGroup``, ``RolloutEngine``.
* :mod:`.native_sampler`: ``NativeSampler`` (Megatron model, TP ≥ 1, PP = 1).
* :mod:`.vllm_engine`: ``VLLMEngine`` (``vllm.LLM`` on an HF directory; ``update_weights``; isolated mode).
* :mod:`.sampling`: temperature/top-p processing, behaviour log-probs, counter-based sampling.
* :mod:`.store`: ``TrajectoryStore`` (Arrow parts, checksummed manifest, resume).
* :mod:`.runner`: ``rollout_prompts`` / ``run_rollout`` (``cropi rollout``).
* :mod:`.config`: ``RolloutConfig``, ``VLLMConfig``.

Engines are imported from their modules (they pull in Megatron or vLLM); this package imports neither.
"""

from megatron_cropi.rollout.config import RolloutConfig, VLLMConfig
from megatron_cropi.rollout.store import StoreError, StoreHeader, TrajectoryStore
from megatron_cropi.rollout.types import PromptRecord, Response, RolloutEngine, RolloutGroup, SamplingParams

__all__ = [
    "RolloutConfig", "VLLMConfig", "StoreError", "StoreHeader", "TrajectoryStore", "PromptRecord", "Response",
    "RolloutEngine", "RolloutGroup", "SamplingParams",
]
