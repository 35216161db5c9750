"""The reward function built on a verifier, and building a verifier by name.

A verifier says whether a decoded response answers its prompt correctly (1.0) or not (0.0). The
:class:`RewardFunction` adds what is the same for every verifier: a response cut at ``max_tokens``
scores 0 when ``require_finished``, and an optional format reward ``format_weight × format_ok``::

    reward = correct · [finished or not require_finished] + format_weight · format_ok

New verifiers register by name (``@register_verifier("mine")``) and are chosen with
``rollout.reward.verifier: mine``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# The built-in verifiers register themselves on import; they import only .verifier, so no circle.
from megatron_cropi.rewards.exact import ExactMatchVerifier  # noqa: F401 - registers "exact"
from megatron_cropi.rewards.math_verifier import MathVerifier  # noqa: F401 - registers "math"
from megatron_cropi.rewards.config import RewardConfig
from megatron_cropi.rewards.verifier import Verifier, VerifyItem, register_verifier, registered_verifiers

__all__ = ["VerifyItem", "Verifier", "register_verifier", "build_verifier", "available_verifiers", "RewardFunction"]


def available_verifiers() -> list[str]:
    """Registered verifier names."""
    return sorted(registered_verifiers())


def build_verifier(cfg: RewardConfig) -> Verifier:
    """The verifier ``cfg.verifier`` names.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
    """
    if cfg.verifier == "auto":
        raise KeyError("rollout.reward.verifier is 'auto': resolve it for the data first "
                       "(megatron_cropi.rewards.config.reward_config_for)")
    factories = registered_verifiers()
    if cfg.verifier not in factories:
        raise KeyError(f"rollout.reward.verifier: unknown verifier {cfg.verifier!r}; registered: "
                       f"{', '.join(sorted(factories))}")
    return factories[cfg.verifier](cfg)


class RewardFunction:
    """Rewards of decoded responses: verifier correctness, finish rule and format reward.

    Args:
        cfg: the reward configuration.
        verifier: a verifier instance (default: :func:`build_verifier` of ``cfg``).
    """

    def __init__(self, cfg: RewardConfig, verifier: Verifier | None = None):
        self.cfg = cfg
        self.verifier = verifier or build_verifier(cfg)

    def __call__(self, items: Sequence[VerifyItem]) -> np.ndarray:
        """``float32 [N]`` rewards, in input order."""
        if not items:
            return np.zeros(0, dtype=np.float32)
        correct = np.asarray(self.verifier.score(items), dtype=np.float32)
        if self.cfg.require_finished:
            correct = correct * np.asarray([it.finished for it in items], dtype=np.float32)
        if self.cfg.format_weight:
            fmt = np.asarray([self.verifier.format_ok(it) for it in items], dtype=np.float32)
            correct = correct + np.float32(self.cfg.format_weight) * fmt
        return correct.astype(np.float32)

    def close(self) -> None:
        self.verifier.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
