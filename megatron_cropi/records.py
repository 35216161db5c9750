"""Records shared by data loading, rollout engines, the trajectory store, POPI capture and GRPO.

Token ids are ``int32`` numpy arrays and log-probs ``float32`` arrays: cheap to store, and turned
into tensors only where a model consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["PromptRecord", "SamplingParams", "Response", "RolloutGroup", "RolloutEngine"]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a pool or target set.

    Attributes:
        prompt_id: stable content hash (same text and answer → same id, across runs and machines).
        token_ids: the tokenized prompt (chat template applied where the tokenizer has one), ``int32 [P]``.
        answer: the reference answer the verifier checks against.
        source: dataset or task family (``"gsm8k"``, ``"add3c"``), for reports and mixes.
        text: the prompt text, when it came from text.
        meta: anything else from the input row.
    """

    prompt_id: str
    token_ids: np.ndarray
    answer: str
    source: str = ""
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingParams:
    """How responses were (or are to be) sampled. Stored with every trajectory store.

    ``logprobs`` says which distribution the stored behaviour log-probs are of: ``"sampling"`` =
    the distribution actually sampled from (temperature and top-p applied, vLLM's
    ``processed_logprobs``); ``"raw"`` = the untempered model (``log_softmax(logits)``).
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int = 0
    logprobs: Literal["sampling", "raw"] = "sampling"

    @property
    def logprob_temperature(self) -> float:
        """T of the distribution the stored log-probs are of: ``π_β(y) ∝ p(y)^(1/T)`` when they are of the
        sampled distribution at T > 0, else 1 (raw log-probs, or greedy). POPI's importance ratio must
        compare the current policy at this same temperature."""
        return self.temperature if self.logprobs == "sampling" and self.temperature > 0 else 1.0


@dataclass(frozen=True)
class Response:
    """One sampled response.

    Attributes:
        token_ids: generated tokens, ``int32 [T]``, including the stop token when ``finished``.
        logprobs: behaviour log-prob of each generated token, ``float32 [T]``.
        finished: ended on a stop token (False: cut at ``max_tokens``).
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    finished: bool = True


@dataclass(frozen=True)
class RolloutGroup:
    """The K responses of one prompt with their rewards: the unit POPI scores and GRPO trains on.

    Attributes:
        prompt: the prompt.
        responses: K responses.
        rewards: ``float32 [K]``.
        policy_version: checkpoint step of the policy that sampled them (β: the initial one).
    """

    prompt: PromptRecord
    responses: tuple[Response, ...]
    rewards: np.ndarray
    policy_version: int = 0

    @property
    def prompt_id(self) -> str:
        return self.prompt.prompt_id

    @property
    def pass_rate(self) -> float:
        return float(np.mean(self.rewards > 0.5)) if len(self.rewards) else 0.0

    @property
    def zero_variance(self) -> bool:
        """All K rewards equal: group advantages are all zero, so the prompt carries no gradient."""
        return bool(len(self.rewards) == 0 or np.all(self.rewards == self.rewards[0]))


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates K responses per prompt with the behaviour log-probs of the sampled tokens."""

    def generate(self, prompts: Sequence[PromptRecord], sampling: SamplingParams) -> list[list[Response]]:
        """``sampling.n`` responses for each prompt, in prompt order."""
        ...
