"""Rollouts: records, engines (vLLM, native Megatron sampler), and the trajectory store.

* records (``PromptRecord``, ``SamplingParams``, ``Response``, ``RolloutGroup``, ``RolloutEngine``) live in
  :mod:`megatron_cropi.records` and are re-exported here.
* :mod:`.native_sampler`: ``NativeSampler`` (Megatron model, TP ≥ 1, PP = 1).
* :mod:`.vllm_engine`: ``VLLMEngine`` (``vllm.LLM`` on an HF directory; ``update_weights``; isolated mode).
* :mod:`.sampling`: temperature/top-p processing, behaviour log-probs, counter-based sampling.
* :mod:`.store`: ``TrajectoryStore`` (Arrow parts, checksummed manifest, resume); its header and
  ``StoreError``: :mod:`.store_header`; its index (:mod:`.row_index`), written once complete and read
  memory-mapped: :mod:`.store_index`.
* :mod:`.runner`: ``rollout_prompts``: generate, verify, commit, resume.
* :mod:`.config`: ``RolloutConfig``, ``VLLMConfig``.

Engines are imported from their modules (they pull in Megatron or vLLM); this package imports neither.
"""

from megatron_cropi.rollout.config import RolloutConfig, VLLMConfig
from megatron_cropi.rollout.store import StoreError, StoreHeader, TrajectoryStore
from megatron_cropi.records import PromptRecord, Response, RolloutEngine, RolloutGroup, SamplingParams

__all__ = [
    "RolloutConfig", "VLLMConfig", "StoreError", "StoreHeader", "TrajectoryStore", "PromptRecord", "Response",
    "RolloutEngine", "RolloutGroup", "SamplingParams",
]
