"""Rewards: the verifier interface and registry, exact match for the synthetic suite, math-verify in a
process pool with a per-answer timeout, boxed-answer extraction and an optional format reward."""

from megatron_cropi.rewards.base import (
    RewardFunction, Verifier, VerifyItem, available_verifiers, build_verifier, register_verifier,
)
from megatron_cropi.rewards.config import RewardConfig, reward_config_for
from megatron_cropi.rewards.extract import extract_gsm8k_answer, has_boxed_answer, last_boxed

__all__ = [
    "RewardFunction", "Verifier", "VerifyItem", "available_verifiers", "build_verifier", "register_verifier",
    "RewardConfig", "reward_config_for", "extract_gsm8k_answer", "has_boxed_answer", "last_boxed",
]
