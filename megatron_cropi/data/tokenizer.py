"""The tokenizer interface the data loaders, rollout engines and verifiers share.

Two implementations: :class:`HFTokenizer` wraps a Hugging Face tokenizer directory (the chat template
is applied where the tokenizer has one), and :class:`~megatron_cropi.data.char_tokenizer.CharTokenizer`
is the synthetic suite's 32-id character vocabulary. Both expose an ``identity`` string that the
trajectory store records, so a store written with one tokenizer is never read with another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

__all__ = ["TextTokenizer", "HFTokenizer", "load_hf_tokenizer"]


@runtime_checkable
class TextTokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    identity: str
    """Name plus a hash of the vocabulary (and chat template): equal identities tokenize alike."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a user prompt as the model sees it (chat template applied if there is one)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated tokens, up to (not including) the first EOS."""
        ...


class HFTokenizer:
    """A Hugging Face tokenizer directory (``tokenizer.json`` + config, optionally a chat template).

    Args:
        path: directory written by ``save_pretrained``.
        use_chat_template: wrap prompts in the tokenizer's chat template as one user message with a
            generation prompt, when the tokenizer has a template; plain ``encode`` otherwise.
        system_prompt: optional system message placed before the user message in the template.
    """

    def __init__(self, path: str | Path, *, use_chat_template: bool = True, system_prompt: str = ""):
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
        self.path = path
        self.tok = AutoTokenizer.from_pretrained(str(path))
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path}: has no eos_token; set one in its tokenizer_config.json")
        self.eos_token_id = int(self.tok.eos_token_id)
        pad = self.tok.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        self.vocab_size = len(self.tok)
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))
        self.use_chat_template = use_chat_template and self.has_chat_template
        self.system_prompt = system_prompt
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps(self.tok.get_vocab(), sort_keys=True).encode())
        if self.use_chat_template:
            h.update(str(self.tok.chat_template).encode())
            h.update(system_prompt.encode())
        self.identity = f"hf:{path.name}:{h.hexdigest()}"

    def encode_prompt(self, text: str) -> list[int]:
        if not self.use_chat_template:
            return list(self.tok.encode(text, add_special_tokens=True))
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": text})
        # tokenize=False then encode: transformers 4 returns ids, 5 a BatchEncoding for tokenize=True
        rendered = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tok.encode(rendered, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        ids = list(token_ids)
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.tok.decode(ids, skip_special_tokens=True)


def load_hf_tokenizer(path: str | Path, *, use_chat_template: bool = True, system_prompt: str = "") -> HFTokenizer:
    """:class:`HFTokenizer` for ``path``."""
    return HFTokenizer(path, use_chat_template=use_chat_template, system_prompt=system_prompt)
