"""Data configuration (``data:`` in the run config): the synthetic suite or user files.

    data:
      kind: files
      tokenizer: /models/qwen2.5-1.5b-instruct      # HF tokenizer dir; chat template used if it has one
      pool:
        - {path: /data/gsm8k_train.parquet, format: gsm8k}
        - {path: /data/deepscaler.jsonl, format: deepscaler}
      val:
        - {path: /data/math500.jsonl, format: math, source: math500}

Field defaults per format (override with ``prompt_field`` / ``answer_field``; dotted paths reach into
nested mappings): gsm8k ``question``/``answer`` (final answer after ``####``), math
``problem``/``solution`` (last ``\\boxed{}``), deepscaler ``problem``/``answer`` (used as is), and the
RL datasets of two trainers: verl (Parquet: ``prompt`` a list of chat messages ``[{role, content}]``,
the answer in ``reward_model.ground_truth``, the source in ``data_source``) and slime (JSONL: ``prompt``
a string or a list of chat messages, the answer in ``label``). Whatever the format, a prompt field that
holds a chat-message list gives the content of its last ``user`` message as the question.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from megatron_cropi.config.loader import ConfigError, non_default_keys, require

__all__ = ["DatasetFile", "SyntheticConfig", "DataConfig", "FORMAT_FIELDS", "SPLITS", "FILES_ONLY_KEYS"]

SPLITS = ("pool", "val", "test", "check")

# format -> (prompt field, answer field, answer extraction)
FORMAT_FIELDS: dict[str, tuple[str, str, str]] = {
    "gsm8k": ("question", "answer", "gsm8k"),
    "math": ("problem", "solution", "boxed"),
    "deepscaler": ("problem", "answer", "none"),
    "custom": ("prompt", "answer", "none"),
    "verl": ("prompt", "reward_model.ground_truth", "none"),
    "slime": ("prompt", "label", "none"),
}

# Keys that only ``kind: files`` reads; the synthetic suite has its own tokenizer and prompts.
FILES_ONLY_KEYS = ("pool", "val", "test", "check", "tokenizer", "use_chat_template", "system_prompt",
                   "prompt_template", "max_prompt_tokens")

DEFAULT_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass(frozen=True, kw_only=True)
class DatasetFile:
    """One input file of prompts (``.jsonl`` or ``.parquet``)."""

    path: str
    """The file; ``.jsonl``/``.json`` (one JSON object per line) or ``.parquet``."""
    format: Literal["gsm8k", "math", "deepscaler", "custom", "verl", "slime"] = "custom"
    """Sets the field and answer-extraction defaults (see the module docstring); ``verl`` also takes each
    row's ``data_source`` as its source unless ``source`` is set."""
    prompt_field: str = ""
    """Field holding the question (default from ``format``); dotted for nested mappings."""
    answer_field: str = ""
    """Field holding the reference answer or solution (default from ``format``)."""
    answer_extract: Literal["auto", "none", "gsm8k", "boxed"] = "auto"
    """How the reference answer is taken from the answer field; ``auto`` follows ``format``."""
    source: str = ""
    """Label of these prompts in reports and mixes (default: the file's stem; for ``verl``, each row's
    ``data_source`` when it has one)."""
    limit: int = 0
    """Read at most this many rows (0: all)."""

    def __post_init__(self):
        require(bool(self.path), "path", self.path, "a .jsonl or .parquet file")
        require(self.path.endswith((".jsonl", ".json", ".parquet")), "path", self.path,
                "a file ending in .jsonl, .json or .parquet")
        require(self.limit >= 0, "limit", self.limit, "must be >= 0")

    @property
    def fields(self) -> tuple[str, str, str]:
        """``(prompt_field, answer_field, answer_extract)`` with the format's defaults filled in."""
        p, a, x = FORMAT_FIELDS[self.format]
        extract = x if self.answer_extract == "auto" else self.answer_extract
        return (self.prompt_field or p, self.answer_field or a, extract)


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """The synthetic suite's sets (:mod:`megatron_cropi.data.synthetic`; calibration: docs/design.md §10)."""

    seed: int = 0
    """Every prompt draw derives from this seed (and split and family names)."""
    per_family: int = 160
    """Pool prompts per family (13 families; add1 is capped at 70 of its 100 prompts)."""
    val_size: int = 100
    """Target-gradient ("val") prompts of the target family."""
    test_size: int = 300
    """Held-out target test prompts."""
    check_per_family: int = 50
    """Untargeted check prompts per non-target family."""
    target: str = "add3c"
    """Target family."""
    families: tuple[str, ...] = ()
    """Pool families (empty: all 13)."""
    prompt_length: int = 14
    """Prompts are left-padded with <pad> to this many tokens."""

    def __post_init__(self):
        from megatron_cropi.data.synthetic import FAMILIES

        for key in ("per_family", "val_size", "test_size", "check_per_family"):
            require(0 <= getattr(self, key) <= 1_000_000, key, getattr(self, key), "must be in [0, 1e6]")
        require(self.target in FAMILIES, "target", self.target, f"one of {sorted(FAMILIES)}")
        for i, f in enumerate(self.families):
            require(f in FAMILIES, f"families[{i}]", f, f"one of {sorted(FAMILIES)}")
        require(8 <= self.prompt_length <= 64, "prompt_length", self.prompt_length, "must be in [8, 64]")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where prompts come from and how they are tokenized."""

    kind: Literal["synthetic", "files"] = "synthetic"
    """``synthetic``: the CPU default's task suite; ``files``: user-provided datasets."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The synthetic suite (kind: synthetic)."""
    pool: tuple[DatasetFile, ...] = ()
    """Training pool files (kind: files)."""
    val: tuple[DatasetFile, ...] = ()
    """Target-gradient set files; several sources make several target sets (kind: files)."""
    test: tuple[DatasetFile, ...] = ()
    """Held-out evaluation files (kind: files)."""
    check: tuple[DatasetFile, ...] = ()
    """Untargeted check files (kind: files)."""
    tokenizer: str = ""
    """Hugging Face tokenizer directory (kind: files)."""
    use_chat_template: bool = True
    """Wrap each prompt in the tokenizer's chat template when it has one."""
    system_prompt: str = ""
    """System message for the chat template (empty: none)."""
    prompt_template: str = DEFAULT_TEMPLATE
    """Python format string applied to the question before tokenization; ``{prompt}`` is the question."""
    max_prompt_tokens: int = 0
    """Prompts longer than this (after templating) are dropped and counted; 0: no limit."""

    def __post_init__(self):
        self._refuse_ignored_keys()
        if self.kind == "files":
            require(bool(self.pool), "pool", self.pool, "at least one file when kind is 'files'")
            require(bool(self.tokenizer), "tokenizer", self.tokenizer, "an HF tokenizer directory when kind is 'files'")
        require("{prompt}" in self.prompt_template, "prompt_template", self.prompt_template,
                "a format string containing {prompt}")
        try:
            self.prompt_template.format(prompt="x")
        except (KeyError, IndexError, ValueError) as err:
            require(False, "prompt_template", self.prompt_template, f"a valid format string ({err})")
        require(self.max_prompt_tokens >= 0, "max_prompt_tokens", self.max_prompt_tokens, "must be >= 0")

    def _refuse_ignored_keys(self) -> None:
        """A key the chosen ``kind`` never reads is an error naming it (files named without ``kind:
        files`` would otherwise be skipped silently in favour of the synthetic suite)."""
        if self.kind == "synthetic":
            defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
            for key in FILES_ONLY_KEYS:
                value = getattr(self, key)
                if value != defaults[key]:
                    shown = [f.path for f in value] if key in SPLITS else value
                    hint = ("set data.kind: files to read these files" if key in SPLITS or key == "tokenizer"
                            else f"it applies to data.kind: files only; remove data.{key}")
                    raise ConfigError(key, f"{shown!r} is ignored because data.kind is 'synthetic' (the default, "
                                           f"the built-in task suite): {hint}")
        elif self.kind == "files":
            changed = non_default_keys(self.synthetic, prefix="synthetic")
            if changed:
                key, value = changed[0]
                raise ConfigError(key, f"{value!r} is ignored because data.kind is 'files' (the synthetic suite is "
                                       "not used); remove data.synthetic")

    def files(self, split: str) -> tuple[DatasetFile, ...]:
        """The files of ``split`` (pool, val, test or check)."""
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, split)
