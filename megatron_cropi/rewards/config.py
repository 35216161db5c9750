"""Reward configuration (``rollout.reward`` in the run config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_cropi.config.loader import require

__all__ = ["RewardConfig", "reward_config_for"]


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """How a response's reward is computed: ``correct + format_weight × format_ok``."""

    verifier: str = "auto"
    """Registered verifier: ``exact`` (synthetic suite: text up to <eos> equals the answer), ``math``
    (math-verify in a process pool), or ``auto``: exact for the synthetic suite, math for files."""
    format_weight: float = 0.0
    """Weight of the format reward (math: a complete ``\\boxed{}`` answer and a stop token; exact: a
    stop token); 0 turns it off."""
    require_finished: bool = True
    """A response cut at ``max_tokens`` (no stop token) is scored 0."""
    timeout_s: float = 5.0
    """Per-answer wall-clock bound of the math verifier; a hung answer scores 0 and is logged."""
    num_workers: int = 2
    """Math verifier worker processes."""

    def __post_init__(self):
        require(bool(self.verifier), "verifier", self.verifier, "a registered verifier name (auto, exact, math)")
        require(0.0 <= self.format_weight <= 10.0, "format_weight", self.format_weight, "must be in [0, 10]")
        require(0.0 < self.timeout_s <= 3600.0, "timeout_s", self.timeout_s, "must be in (0, 3600] seconds")
        require(1 <= self.num_workers <= 256, "num_workers", self.num_workers, "must be between 1 and 256")


def reward_config_for(reward: RewardConfig, data_kind: str) -> RewardConfig:
    """``reward`` with ``verifier: auto`` resolved for the data (``synthetic`` → exact, files → math)."""
    if reward.verifier != "auto":
        return reward
    return dataclasses.replace(reward, verifier="exact" if data_kind == "synthetic" else "math")
