"""The verifier interface, its registry, and the reward function built on a verifier.

A verifier says whether a decoded response answers its prompt correctly (1.0) or not (0.0). The
:class:`RewardFunction` adds what is the same for every verifier: a response cut at ``max_tokens``
scores 0 when ``require_finished``, and an optional format reward ``format_weight × format_ok``::

    reward = correct · [finished or not require_finished] + format_weight · format_ok

New verifiers register by name (``@register_verifier("mine")``) and are chosen with
``rollout.reward.verifier: mine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from megatron_cropi.rewards.config import RewardConfig

__all__ = ["VerifyItem", "Verifier", "register_verifier", "build_verifier", "available_verifiers", "RewardFunction"]


@dataclass(frozen=True)
class VerifyItem:
    """One response to check.

    Attributes:
        response: decoded response text, up to (not including) the stop token.
        reference: the prompt's reference answer (``PromptRecord.answer``).
        finished: the response ended on a stop token.
    """

    response: str
    reference: str
    finished: bool = True


@runtime_checkable
class Verifier(Protocol):
    """Scores responses 1.0 (correct) or 0.0."""

    name: str

    def score(self, items: Sequence[VerifyItem]) -> np.ndarray:
        """Correctness of each item, ``float32 [N]`` in {0, 1}, in input order."""
        ...

    def format_ok(self, item: VerifyItem) -> bool:
        """Whether the response has the expected form (used by the format reward)."""
        ...

    def close(self) -> None:
        """Release worker processes (idempotent)."""
        ...


_REGISTRY: dict[str, Callable[[RewardConfig], Verifier]] = {}


def register_verifier(name: str):
    """Class/factory decorator: ``factory(cfg: RewardConfig) -> Verifier`` becomes available as ``name``."""
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def available_verifiers() -> list[str]:
    """Registered verifier names."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    import megatron_cropi.rewards.exact  # noqa: F401 - registers "exact"
    import megatron_cropi.rewards.math_verifier  # noqa: F401 - registers "math"


def build_verifier(cfg: RewardConfig) -> Verifier:
    """The verifier ``cfg.verifier`` names.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
    """
    _load_builtin()
    if cfg.verifier == "auto":
        raise KeyError("rollout.reward.verifier is 'auto': resolve it for the data first "
                       "(megatron_cropi.rewards.config.reward_config_for)")
    if cfg.verifier not in _REGISTRY:
        raise KeyError(f"rollout.reward.verifier: unknown verifier {cfg.verifier!r}; registered: "
                       f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.verifier](cfg)


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
