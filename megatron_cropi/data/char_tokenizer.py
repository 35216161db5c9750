"""The synthetic suite's character tokenizer: exactly 32 ids, prompts left-padded to a fixed length.

Ids (``cpu-default`` has ``vocab_size=32`` and logits are never masked, so the vocabulary is the
model's whole output space)::

    0 <pad>   1 <eos>   2..11 '0'..'9'   12 '+'  13 '-'  14 '*'  15 '='
    16 'R'  17 'M'  18 'm'  19 'S'  20 'C'  21 ','  22 '<'  23 '>'   24..31 reserved

Reserved ids never occur in data. A sampled reserved id (or a pad inside a response) decodes to
U+FFFD, which no answer contains, so it simply earns reward 0.

Every prompt is left-padded with ``<pad>`` to ``prompt_length`` tokens (14 by default) and the model
sees the pads: every prompt has the same length, so sampling, scoring and training see identical
sequences whatever the batch (no batch-dependent padding exists).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

__all__ = ["CharTokenizer", "CHAR_VOCAB", "PAD_ID", "EOS_ID", "UNKNOWN_CHAR"]

PAD_ID, EOS_ID = 0, 1
_CHARS = "0123456789+-*=RMmSC,<>"
CHAR_VOCAB: tuple[str, ...] = ("<pad>", "<eos>") + tuple(_CHARS) + tuple(f"<r{i}>" for i in range(8))
UNKNOWN_CHAR = "\ufffd"
assert len(CHAR_VOCAB) == 32


class CharTokenizer:
    """Character-level tokenizer of the synthetic suite (implements ``TextTokenizer``).

    Args:
        prompt_length: every prompt is left-padded to this many tokens; longer prompts are an error.
    """

    vocab_size = len(CHAR_VOCAB)
    eos_token_id = EOS_ID
    pad_token_id = PAD_ID

    def __init__(self, prompt_length: int = 14):
        if prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
        self.prompt_length = prompt_length
        self._ids = {c: i for i, c in enumerate(CHAR_VOCAB) if len(c) == 1}
        digest = hashlib.blake2b("|".join(CHAR_VOCAB).encode(), digest_size=8).hexdigest()
        self.identity = f"char:synthetic-v1:{digest}:left-pad-{prompt_length}"

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, one per character (no padding, no EOS)."""
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} of {text!r} is not in the synthetic vocabulary "
                             f"{_CHARS!r}") from None

    def encode_prompt(self, text: str) -> list[int]:
        """``text`` left-padded with ``<pad>`` to ``prompt_length`` ids."""
        ids = self.encode(text)
        if len(ids) > self.prompt_length:
            raise ValueError(f"prompt {text!r} has {len(ids)} characters, more than prompt_length="
                             f"{self.prompt_length}")
        return [PAD_ID] * (self.prompt_length - len(ids)) + ids

    def encode_answer(self, answer: str) -> list[int]:
        """Ids of the answer followed by ``<eos>``: the target a response must reproduce exactly."""
        return self.encode(answer) + [EOS_ID]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text up to the first ``<eos>``; pads, reserved and out-of-range ids become U+FFFD."""
        out = []
        for t in token_ids:
            t = int(t)
            if t == EOS_ID:
                break
            tok = CHAR_VOCAB[t] if 0 <= t < len(CHAR_VOCAB) else ""
            out.append(tok if len(tok) == 1 else UNKNOWN_CHAR)
        return "".join(out)
