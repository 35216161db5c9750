"""The synthetic verifiable task suite of the embedded CPU default (its calibration: docs/design.md §10).

Thirteen families of graded difficulty, each prompt a short string over the 32-id character vocabulary
(:mod:`~megatron_cropi.data.char_tokenizer`), each answer checked by exact match up to ``<eos>``:

=========  ====================================  ==========================
family     prompt → answer                       note
=========  ====================================  ==========================
add1       ``3+4=`` → ``7``                      1 digit + 1 digit
add2       ``37+45=`` → ``28``                   2d + 2d (82, LSB first)
add3nc     ``123+456=`` → ``975``                3d + 3d, no carry
add3c      ``158+267=`` → ``524``                3d + 3d, ≥1 carry: TARGET
add4       ``1234+5678=`` → ``2196``             4d + 4d
sub2/sub3  ``73-28=`` → ``54``                   a ≥ b
mul1       ``37*4=`` → ``841``                   2d × 1d
rev        ``R12345=`` → ``54321``               reverse a 5-digit string
max/min    ``M37,92,41=`` → ``92``               of 3-4 two-digit numbers
sumd       ``S1234=`` → ``01``                   digit sum of 100..9999
cmp        ``C123,456=`` → ``<``                 compare two 3-digit numbers
=========  ====================================  ==========================

**Arithmetic answers (add*, sub*, mul1, sumd) are written least-significant digit first**: with normal
order a ~400k-parameter model learns no multi-digit addition in a CPU budget; LSB-first answers give
a phase transition after ~1500 warm-up steps (docs/design.md §10). rev/max/min/cmp answers are copies
or symbols and keep their natural order.

Splits (:func:`build_synthetic_sets`), disjoint by prompt id and drawn in this order so that the
target sets do not move when the pool size changes: target test set (300 ``add3c``), target gradient
set "val" (100 ``add3c``), the pool (13 families × 160) and the untargeted check set (12 other families
× 50). ``add1`` has only 100 distinct prompts: the pool takes at most 70 % of a family's space and the
check set what is left.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from megatron_cropi.data.char_tokenizer import PAD_ID, CharTokenizer
from megatron_cropi.data.prompt_ids import prompt_id
from megatron_cropi.records import PromptRecord

__all__ = [
    "Family", "FAMILIES", "TARGET_FAMILY", "SyntheticSets", "build_synthetic_sets", "make_record",
    "supervised_batches", "ANSWER_LENGTH",
]

TARGET_FAMILY = "add3c"
ANSWER_LENGTH = 6
"""Longest answer (5 characters) + ``<eos>``: the ``max_tokens`` a rollout needs."""
POOL_SPACE_FRACTION = 0.7


def _lsb(n: int) -> str:
    return str(n)[::-1]


def _has_carry(a: int, b: int) -> bool:
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def _add(lo: int, hi: int, carry: bool | None) -> Callable[[random.Random], tuple[str, str]]:
    def sample(rng: random.Random) -> tuple[str, str]:
        while True:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if carry is None or _has_carry(a, b) == carry:
                return f"{a}+{b}=", _lsb(a + b)
    return sample


def _sub(lo: int, hi: int) -> Callable[[random.Random], tuple[str, str]]:
    def sample(rng: random.Random) -> tuple[str, str]:
        a, b = sorted((rng.randint(lo, hi), rng.randint(lo, hi)), reverse=True)
        return f"{a}-{b}=", _lsb(a - b)
    return sample


def _mul1(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(0, 9)
    return f"{a}*{b}=", _lsb(a * b)


def _rev(rng: random.Random) -> tuple[str, str]:
    s = str(rng.randint(10000, 99999))
    return f"R{s}=", s[::-1]


def _extreme(symbol: str, fn) -> Callable[[random.Random], tuple[str, str]]:
    def sample(rng: random.Random) -> tuple[str, str]:
        xs = [rng.randint(10, 99) for _ in range(rng.choice((3, 4)))]
        return f"{symbol}{','.join(map(str, xs))}=", str(fn(xs))
    return sample


def _sumd(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(100, 9999)
    return f"S{n}=", _lsb(sum(int(c) for c in str(n)))


def _cmp(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(100, 999)
    b = a if rng.random() < 0.2 else rng.randint(100, 999)
    return f"C{a},{b}=", "<" if a < b else (">" if a > b else "=")


@dataclass(frozen=True)
class Family:
    """One task family.

    Attributes:
        name: family name, the ``source`` of its prompts.
        sample: draws one ``(prompt_text, answer_text)`` from a ``random.Random``.
        space: number of distinct prompts the family has.
    """

    name: str
    sample: Callable[[random.Random], tuple[str, str]]
    space: int


_NC3 = 36 * 55 * 55  # 3-digit pairs with no column summing to >= 10
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("add1", _add(0, 9, None), 100),
    Family("add2", _add(10, 99, None), 90 * 90),
    Family("add3nc", _add(100, 999, False), _NC3),
    Family("add3c", _add(100, 999, True), 900 * 900 - _NC3),
    Family("add4", _add(1000, 9999, None), 9000 * 9000),
    Family("sub2", _sub(10, 99), 90 * 91 // 2),
    Family("sub3", _sub(100, 999), 900 * 901 // 2),
    Family("mul1", _mul1, 90 * 10),
    Family("rev", _rev, 90000),
    Family("max", _extreme("M", max), 90 ** 3 + 90 ** 4),
    Family("min", _extreme("m", min), 90 ** 3 + 90 ** 4),
    Family("sumd", _sumd, 9900),
    Family("cmp", _cmp, 900 * 900),
]}


def make_record(text: str, answer: str, family: str, tokenizer: CharTokenizer, split: str = "") -> PromptRecord:
    """The :class:`PromptRecord` of one synthetic prompt (left-padded token ids, content-hash id)."""
    return PromptRecord(
        prompt_id=prompt_id(text, answer),
        token_ids=np.asarray(tokenizer.encode_prompt(text), dtype=np.int32),
        answer=answer, source=family, text=text, meta={"split": split} if split else {},
    )


def _rng(seed: int, *parts: str) -> random.Random:
    digest = hashlib.blake2b(":".join((str(seed),) + parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _draw(family: Family, n: int, rng: random.Random, taken: set[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    attempts, max_attempts = 0, 200 * n + 20000
    while len(out) < n and attempts < max_attempts:
        attempts += 1
        text, answer = family.sample(rng)
        pid = prompt_id(text, answer)
        if pid not in taken:
            taken.add(pid)
            out.append((text, answer))
    return out


@dataclass
class SyntheticSets:
    """The four disjoint prompt sets of the CPU default.

    Attributes:
        pool: the training pool CROPI selects from (every family).
        val: target-gradient set ("val", target family).
        test: held-out target test set (target family).
        check: untargeted check set (every other family).
        counts: ``{split: {family: n}}`` actually drawn (small families may fall short).
    """

    pool: list[PromptRecord]
    val: list[PromptRecord]
    test: list[PromptRecord]
    check: list[PromptRecord]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def split(self, name: str) -> list[PromptRecord]:
        """The set called ``name`` (pool, val, test or check)."""
        if name not in ("pool", "val", "test", "check"):
            raise KeyError(f"unknown synthetic split {name!r}; expected pool, val, test or check")
        return getattr(self, name)


def build_synthetic_sets(
    *,
    seed: int = 0,
    per_family: int = 160,
    val_size: int = 100,
    test_size: int = 300,
    check_per_family: int = 50,
    target: str = TARGET_FAMILY,
    families: Sequence[str] | None = None,
    tokenizer: CharTokenizer | None = None,
) -> SyntheticSets:
    """Draw the pool, val, test and check sets deterministically from ``seed``.

    Args:
        seed: every draw derives from it (and the split and family names), never from the order of calls.
        per_family: pool prompts per family (capped at 70 % of a family's distinct prompts).
        val_size, test_size: target-family prompts in the val and test sets.
        check_per_family: check-set prompts per non-target family.
        target: the target family.
        families: families in the pool (default: all 13).
        tokenizer: the char tokenizer (default ``CharTokenizer()``: prompts padded to 14).

    Returns:
        :class:`SyntheticSets`; prompts in each set ordered by family then draw.
    """
    tok = tokenizer or CharTokenizer()
    names = list(families or FAMILIES)
    for name in names + [target]:
        if name not in FAMILIES:
            raise KeyError(f"unknown synthetic family {name!r}; expected one of {sorted(FAMILIES)}")
    taken: set[str] = set()
    sets: dict[str, list[PromptRecord]] = {"pool": [], "val": [], "test": [], "check": []}
    counts: dict[str, dict[str, int]] = {k: {} for k in sets}
    plan = [("test", target, test_size), ("val", target, val_size)]
    plan += [("pool", f, min(per_family, int(POOL_SPACE_FRACTION * FAMILIES[f].space))) for f in names]
    plan += [("check", f, check_per_family) for f in names if f != target]
    for split, fam, n in plan:
        drawn = _draw(FAMILIES[fam], n, _rng(seed, split, fam), taken)
        sets[split].extend(make_record(t, a, fam, tok, split) for t, a in drawn)
        counts[split][fam] = len(drawn)
    return SyntheticSets(**sets, counts=counts)


def supervised_batches(
    *,
    seed: int,
    batch_size: int = 64,
    families: Sequence[str] | None = None,
    exclude_ids: set[str] | frozenset[str] = frozenset(),
    tokenizer: CharTokenizer | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless supervised warm-up batches of fresh random prompts (uniform over ``families``).

    Each sequence is ``prompt (left-padded) ++ answer ++ <eos>``, right-padded to
    ``prompt_length + ANSWER_LENGTH`` (20) tokens. Megatron's LM convention: ``labels[t]`` is the token
    after ``tokens[t]``; ``loss_mask`` is 1 exactly where the label is an answer token or the ``<eos>``.
    Prompts whose id is in ``exclude_ids`` (e.g. the val and test sets) are never emitted.

    Yields:
        ``{"tokens": int64 [B, S], "labels": int64 [B, S], "loss_mask": float32 [B, S]}``.
    """
    tok = tokenizer or CharTokenizer()
    names = list(families or FAMILIES)
    rng = _rng(seed, "supervised")
    seq = tok.prompt_length + ANSWER_LENGTH
    while True:
        tokens = np.full((batch_size, seq + 1), PAD_ID, dtype=np.int64)
        mask = np.zeros((batch_size, seq), dtype=np.float32)
        row = 0
        while row < batch_size:
            fam = FAMILIES[names[rng.randrange(len(names))]]
            text, answer = fam.sample(rng)
            if exclude_ids and prompt_id(text, answer) in exclude_ids:
                continue
            ids = tok.encode_prompt(text) + tok.encode_answer(answer)
            tokens[row, : len(ids)] = ids
            mask[row, tok.prompt_length - 1: len(ids) - 1] = 1.0  # positions whose *next* token is answer/EOS
            row += 1
        yield {"tokens": tokens[:, :-1].copy(), "labels": tokens[:, 1:].copy(), "loss_mask": mask}
