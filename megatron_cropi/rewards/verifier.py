"""The verifier interface and its registry: what every verifier module imports (and nothing else here).

A verifier says whether a decoded response answers its prompt correctly (1.0) or not (0.0). New
verifiers register by name (``@register_verifier("mine")``) and are chosen with
``rollout.reward.verifier: mine``; :mod:`.base` builds them by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from megatron_cropi.rewards.config import RewardConfig

__all__ = ["VerifyItem", "Verifier", "register_verifier", "registered_verifiers"]


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


def registered_verifiers() -> dict[str, Callable[[RewardConfig], Verifier]]:
    """``{name: factory}`` of every verifier registered so far (a copy)."""
    return dict(_REGISTRY)
