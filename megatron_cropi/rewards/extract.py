"""Answer extraction: ``\\boxed{...}`` (nested braces, last one wins) and GSM8K's ``#### 42``.

Pure string functions used on both sides: the data loaders take reference answers out of MATH
solutions and GSM8K answers, and the math verifier's format reward asks whether a response boxed one.
"""

from __future__ import annotations

import re

__all__ = ["last_boxed", "extract_gsm8k_answer", "has_boxed_answer", "normalize_number"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")


def _braced(text: str, start: int) -> str | None:
    """Content of the balanced ``{...}`` group opening at ``text[start]``, or None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        escaped = i > 0 and text[i - 1] == "\\"  # \{ and \} are literal braces, not grouping
        if c == "{" and not escaped:
            depth += 1
        elif c == "}" and not escaped:
            depth -= 1
            if depth == 0:
                return text[start + 1: i]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` → ``\\frac{1}{2}``); ``\\boxed 5`` (no braces)
    gives the following token. Returns None when there is no complete boxed answer; an unclosed last
    ``\\boxed{`` falls back to the previous complete one.
    """
    for m in reversed(list(_BOXED.finditer(text))):
        rest = m.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            inner = _braced(text, rest)
            if inner is not None:
                return inner.strip()
            continue
        if rest > m.end():  # "\boxed 5": up to whitespace or '$'
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


def has_boxed_answer(text: str) -> bool:
    """True when ``text`` has a complete, non-empty boxed answer (the format reward's test)."""
    inner = last_boxed(text)
    return bool(inner and inner.strip())


def normalize_number(text: str) -> str:
    """``"1,234.50 "`` → ``"1234.50"``: thousands separators and surrounding spaces/dollars removed."""
    return text.strip().strip("$").replace(",", "").strip()


def extract_gsm8k_answer(answer: str) -> str | None:
    """The final answer after GSM8K's ``####`` marker (separators removed), or None if absent."""
    if "####" not in answer:
        return None
    final = normalize_number(answer.rsplit("####", 1)[1])
    return final or None
