"""The order in which GRPO visits its prompts: shuffled epochs, a resumable position.

Epoch ``e`` visits the prompts in a permutation drawn from ``(seed, e, prompt-set hash)`` only, so a
resumed run (position ``(epoch, index)`` restored) sees exactly the batches an uninterrupted one would.
A batch that runs past the end of an epoch continues with the next epoch's permutation. Swapping the
prompt set (a new CROPI stage's subset) restarts at epoch 0 of the new set.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from megatron_cropi.records import PromptRecord

__all__ = ["PromptStream"]


def _set_hash(prompts: Sequence[PromptRecord]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in prompts:
        h.update(p.prompt_id.encode())
        h.update(b"\0")
    return h.hexdigest()


class PromptStream:
    """Endless batches of prompts in seeded, shuffled epochs.

    Args:
        prompts: the prompt set (at least one).
        seed: base seed of the permutations.
        shuffle: False visits the prompts in the given order every epoch.
    """

    def __init__(self, prompts: Sequence[PromptRecord], *, seed: int = 0, shuffle: bool = True):
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.set_prompts(prompts)

    def set_prompts(self, prompts: Sequence[PromptRecord]) -> None:
        """Replace the prompt set and restart at its first epoch. Shuffled, the set is taken in prompt-id
        order first, so its batches depend on which prompts it holds and the seed, not on how they were
        listed: a background stage's whole pool before its switch (the pool's order) draws the batches a
        ``full`` stage (its selection's order) draws, and two methods differ only where their sets do."""
        if not prompts:
            raise ValueError("the GRPO prompt set is empty")
        self.prompts = sorted(prompts, key=lambda p: p.prompt_id) if self.shuffle else list(prompts)
        self.set_hash = _set_hash(self.prompts)
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        digest = hashlib.blake2b(f"{self.seed}:{epoch}:{self.set_hash}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little")).permutation(len(self.prompts))

    def next_batch(self, size: int) -> list[PromptRecord]:
        """The next ``size`` prompts (crossing into the next epoch when needed)."""
        out = []
        while len(out) < size:
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(out), len(self._order) - self.index)
            out.extend(self.prompts[i] for i in self._order[self.index:self.index + take])
            self.index += take
        return out

    def state_dict(self) -> dict:
        """The position: ``{"epoch", "index", "set_hash", "size"}`` (JSON-serialisable)."""
        return {"epoch": self.epoch, "index": self.index, "set_hash": self.set_hash, "size": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved with the same prompt set.

        Raises:
            ValueError: the position belongs to another prompt set (naming both hashes).
        """
        if state.get("set_hash") != self.set_hash:
            raise ValueError(f"the saved data position is for prompt set {state.get('set_hash')!r} "
                             f"({state.get('size')} prompts), this run's set is {self.set_hash!r} "
                             f"({len(self.prompts)} prompts)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
