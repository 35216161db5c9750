"""The synthetic suite: 32-id tokenizer, 13 families with correct LSB-first answers, disjoint splits,
determinism, and supervised warm-up batches."""

import re

import numpy as np
import pytest

from megatron_cropi.data.char_tokenizer import CHAR_VOCAB, EOS_ID, PAD_ID, UNKNOWN_CHAR, CharTokenizer
from megatron_cropi.data.prompt_ids import prompt_id
from megatron_cropi.data.synthetic import (
    ANSWER_LENGTH, FAMILIES, TARGET_FAMILY, build_synthetic_sets, supervised_batches,
)
from megatron_cropi.model.config import MODEL_PRESETS
from megatron_cropi.rewards.base import RewardFunction, VerifyItem
from megatron_cropi.rewards.config import RewardConfig


def _solve(text: str) -> str:
    """An independent reference solver of every family (answers of arithmetic reversed)."""
    body = text[:-1]
    if body[0] == "R":
        return body[1:][::-1]
    if body[0] in "Mm":
        xs = [int(x) for x in body[1:].split(",")]
        return str(max(xs) if body[0] == "M" else min(xs))
    if body[0] == "S":
        return str(sum(map(int, body[1:])))[::-1]
    if body[0] == "C":
        a, b = map(int, body[1:].split(","))
        return "<" if a < b else ">" if a > b else "="
    a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)", body).groups()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert value >= 0
    return str(value)[::-1]


@pytest.fixture(scope="module")
def sets():
    return build_synthetic_sets(seed=0)


def test_tokenizer_has_exactly_the_cpu_default_vocabulary():
    tok = CharTokenizer()
    assert tok.vocab_size == len(CHAR_VOCAB) == MODEL_PRESETS["cpu-default"][0]["vocab_size"] == 32
    ids = tok.encode_prompt("12+3=")
    assert len(ids) == 14 and ids[:9] == [PAD_ID] * 9 and tok.decode(ids[9:]) == "12+3="
    assert tok.decode(tok.encode_answer("0321") + [5, 6]) == "0321"  # stops at <eos>
    assert tok.decode([2, 24, 3, PAD_ID, 31]) == "0" + UNKNOWN_CHAR + "1" + UNKNOWN_CHAR * 2  # reserved/pad never match
    with pytest.raises(ValueError, match="not in the synthetic vocabulary"):
        tok.encode("1/2")
    with pytest.raises(ValueError, match="prompt_length"):
        tok.encode_prompt("1" * 15)


def test_default_sets_sizes_disjoint_and_answers_correct(sets):
    assert set(FAMILIES) == {"add1", "add2", "add3nc", "add3c", "add4", "sub2", "sub3", "mul1", "rev", "max", "min",
                             "sumd", "cmp"}
    assert len(sets.val) == 100 and len(sets.test) == 300
    assert sets.counts["pool"] == {f: (70 if f == "add1" else 160) for f in FAMILIES}  # add1 has 100 prompts
    assert sets.counts["check"] == {f: (30 if f == "add1" else 50) for f in FAMILIES if f != TARGET_FAMILY}
    ids = [r.prompt_id for s in (sets.pool, sets.val, sets.test, sets.check) for r in s]
    assert len(ids) == len(set(ids)) == 1990 + 100 + 300 + 580
    tok = CharTokenizer()
    for split in (sets.pool, sets.val, sets.test, sets.check):
        for r in split:
            assert r.answer == _solve(r.text), r
            assert len(r.answer) + 1 <= ANSWER_LENGTH and r.token_ids.dtype == np.int32
            assert r.token_ids.tolist() == tok.encode_prompt(r.text) and max(r.token_ids) < 24
    for r in sets.val + sets.test:  # the target: 3-digit additions with at least one carry
        a, b = map(int, r.text[:-1].split("+"))
        assert r.source == TARGET_FAMILY and 100 <= a <= 999 and 100 <= b <= 999
        assert any((a // 10 ** i) % 10 + (b // 10 ** i) % 10 >= 10 for i in range(3))
    assert all(r.source != TARGET_FAMILY for r in sets.check)
    cmp = [r.answer for r in sets.pool if r.source == "cmp"]
    assert {"<", ">", "="} <= set(cmp)
    # 14 prompt tokens + 6 answer tokens fit the cpu-default model's 32 positions
    assert 14 + ANSWER_LENGTH <= MODEL_PRESETS["cpu-default"][0]["max_sequence_length"]


def test_deterministic_and_target_sets_stable_under_pool_size(sets):
    again = build_synthetic_sets(seed=0)
    assert [r.prompt_id for r in again.pool] == [r.prompt_id for r in sets.pool]
    other = build_synthetic_sets(seed=1, per_family=20, val_size=10, test_size=10, check_per_family=5)
    assert [r.prompt_id for r in other.pool] != [r.prompt_id for r in sets.pool[: len(other.pool)]]
    small = build_synthetic_sets(seed=0, per_family=20, check_per_family=5)
    assert [r.prompt_id for r in small.test] == [r.prompt_id for r in sets.test]
    assert [r.prompt_id for r in small.val] == [r.prompt_id for r in sets.val]


def test_supervised_batches_mask_answer_and_eos_only(sets):
    exclude = {r.prompt_id for r in sets.test + sets.val}
    tok = CharTokenizer()
    batches = supervised_batches(seed=3, batch_size=256, exclude_ids=exclude)
    for _ in range(3):
        b = next(batches)
        tokens, labels, mask = b["tokens"], b["labels"], b["loss_mask"]
        assert tokens.shape == labels.shape == mask.shape == (256, 14 + ANSWER_LENGTH)
        assert (labels[:, :-1] == tokens[:, 1:]).all() and tokens.max() < 24
        for row in range(256):
            seq = np.concatenate([tokens[row], labels[row, -1:]])
            prompt = tok.decode(seq[:14][seq[:14] != PAD_ID])
            eos = 14 + list(seq[14:]).index(EOS_ID)
            answer = tok.decode(seq[14:])
            assert answer == _solve(prompt)
            # loss on exactly the answer tokens and the <eos>: positions whose label is one of them
            assert mask[row].nonzero()[0].tolist() == list(range(13, eos))
            assert prompt_id(prompt, answer) not in exclude


def test_exact_reward_on_synthetic_answers(sets):
    tok = CharTokenizer()
    fn = RewardFunction(RewardConfig(verifier="exact", format_weight=0.5))
    r = sets.test[0]
    right = tok.encode_answer(r.answer)
    wrong = tok.encode_answer(r.answer[::-1] + "1")
    items = [VerifyItem(tok.decode(right), r.answer, True), VerifyItem(tok.decode(wrong), r.answer, True),
             VerifyItem(tok.decode(right[:-1]), r.answer, False), VerifyItem(tok.decode([24] + right), r.answer, True)]
    assert fn(items).tolist() == [1.5, 0.5, 0.0, 0.0]
