"""The trajectory store's header: what a store holds, compared field by field when it is reopened.

``header.json`` of a :class:`~megatron_cropi.rollout.store.TrajectoryStore` is a :class:`StoreHeader`:
the schema version, the sampling parameters (with the log-prob semantics), tokenizer and model
identity, policy version, pool hash and size, and what wrote it. :func:`read_header` reads it and
checks the schema version and the fields; :meth:`StoreHeader.mismatches` names every compared field
that differs from what a run expects. Every error of a store, its header's included, is a
:class:`StoreError`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_cropi.records import SamplingParams

__all__ = ["StoreError", "StoreHeader", "SCHEMA_VERSION", "read_store_json", "read_header"]

SCHEMA_VERSION = 1
_CHECKED_FIELDS = ("schema_version", "sampling", "tokenizer", "model", "policy_version", "pool_hash", "num_prompts")


class StoreError(RuntimeError):
    """The store on disk is corrupt, truncated, or does not match what the run expects."""


@dataclass(frozen=True)
class StoreHeader:
    """What a trajectory store holds; compared field by field on reopen.

    Attributes:
        sampling: the :class:`SamplingParams` as a mapping (``logprobs`` says which distribution the
            behaviour log-probs are of: ``sampling`` = temperature and top-p applied, ``raw`` = untempered).
        tokenizer: tokenizer identity (``TextTokenizer.identity``).
        model: identity of the behaviour policy's weights (checkpoint path/step or a hash).
        policy_version: checkpoint step of the behaviour policy.
        pool_hash: :func:`~megatron_cropi.data.prompt_ids.pool_hash` of the prompts to roll out.
        num_prompts: how many prompts the finished store holds.
        created_by: program and version that wrote it (not compared).
        engine: ``native`` or ``vllm`` (not compared: both sample the same distribution).
    """

    sampling: dict
    tokenizer: str
    model: str
    policy_version: int
    pool_hash: str
    num_prompts: int
    created_by: str = ""
    engine: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, sampling: SamplingParams, **kwargs) -> "StoreHeader":
        from megatron_cropi import __version__

        kwargs.setdefault("created_by", f"megatron_cropi {__version__}")
        return cls(sampling=dataclasses.asdict(sampling), **kwargs)

    @property
    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def mismatches(self, other: "StoreHeader") -> list[str]:
        """``"field: store has X, run expects Y"`` for every compared field that differs."""
        a, b = self.to_dict(), other.to_dict()
        out = []
        for k in _CHECKED_FIELDS:
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                out += [f"{k}.{s}: store has {a[k].get(s)!r}, run expects {b[k].get(s)!r}"
                        for s in sorted(set(a[k]) | set(b[k])) if a[k].get(s) != b[k].get(s)]
            elif a[k] != b[k]:
                out.append(f"{k}: store has {a[k]!r}, run expects {b[k]!r}")
        return out


def read_store_json(path: Path, what: str) -> dict:
    """The JSON file ``path`` of a store (its ``what``: header or manifest); a :class:`StoreError` naming
    the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StoreError(f"{path}: cannot read the store's {what} ({err}); the file is truncated or corrupt") from None


def read_header(path: Path) -> StoreHeader:
    """The header of the store directory ``path``, checked: ``header.json`` exists, is of this code's
    :data:`SCHEMA_VERSION`, and has no unknown and no missing required field (else :class:`StoreError`)."""
    if not (path / "header.json").is_file():
        raise StoreError(f"{path}: not a trajectory store (no header.json)")
    raw = read_store_json(path / "header.json", "header")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path / 'header.json'}: schema_version {raw.get('schema_version')!r}, this code reads "
                         f"{SCHEMA_VERSION}")
    known = {f.name for f in dataclasses.fields(StoreHeader)}
    if set(raw) - known or {"sampling", "tokenizer", "model", "policy_version", "pool_hash"} - set(raw):
        raise StoreError(f"{path / 'header.json'}: unexpected or missing header fields "
                         f"{sorted((set(raw) - known) | ({'sampling', 'tokenizer', 'model'} - set(raw)))}")
    return StoreHeader(**raw)
