"""Exact-match verifier of the synthetic suite: the response up to ``<eos>`` equals the answer.

A response without a stop token scores 0 (the answer must be *terminated*, so a model cannot earn the
reward by emitting a correct prefix and rambling on). Sampled pads or reserved ids decode to U+FFFD
and never match.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_cropi.rewards.verifier import VerifyItem, register_verifier
from megatron_cropi.rewards.config import RewardConfig

__all__ = ["ExactMatchVerifier"]


@register_verifier("exact")
class ExactMatchVerifier:
    """``1.0`` iff ``item.finished and item.response == item.reference`` (no normalisation)."""

    name = "exact"

    def __init__(self, cfg: RewardConfig | None = None):
        self.cfg = cfg

    def score(self, items: Sequence[VerifyItem]) -> np.ndarray:
        return np.asarray([float(it.finished and it.response == it.reference) for it in items], dtype=np.float32)

    def format_ok(self, item: VerifyItem) -> bool:
        """Finished, and only characters of the vocabulary (no pad/reserved id) before the stop."""
        return item.finished and "\ufffd" not in item.response

    def close(self) -> None:
        pass
