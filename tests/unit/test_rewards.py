"""Rewards: boxed/GSM8K extraction, the registry, the reward function, and math-verify in a process
pool: correct and incorrect answers of each form, and a pathological answer that hangs math-verify
scored 0 within the per-answer bound, logged, from the main thread and from another thread."""

import logging
import os
import threading
import time

import numpy as np
import pytest

from megatron_cropi.rewards import (
    RewardConfig, RewardFunction, VerifyItem, available_verifiers, build_verifier, extract_gsm8k_answer,
    has_boxed_answer, last_boxed, reward_config_for,
)
from megatron_cropi.rewards.math_verifier import MathVerifier

# A real pathological answer: math-verify parses it instantly but its comparison with 3 never returns
# (sympy tries to evaluate the power tower).
HANGS = "\\boxed{2^{2^{2^{2^{2^{30}}}}}}"


def test_last_boxed_nested_last_wins_and_edge_cases():
    assert last_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{ {a}+{b} }") == "{a}+{b}"
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("$\\boxed 5$") == "5"
    assert last_boxed("\\boxed{2} and \\boxed{3") == "2"  # unclosed last one: the previous complete one
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"  # escaped braces do not close the group
    assert last_boxed("no answer") is None and last_boxed("\\boxedx{1}") is None
    assert has_boxed_answer("\\boxed{4}") and not has_boxed_answer("\\boxed{ }")
    assert extract_gsm8k_answer("a\n#### 1,234 ") == "1234" and extract_gsm8k_answer("42") is None


def test_registry_and_reward_function_rules():
    assert {"exact", "math"} <= set(available_verifiers())
    with pytest.raises(KeyError, match="registered: .*exact"):
        build_verifier(RewardConfig(verifier="nope"))
    items = [VerifyItem("12", "12", True), VerifyItem("12", "12", False), VerifyItem("13", "12", True)]
    with pytest.raises(KeyError, match="auto"):
        build_verifier(RewardConfig())
    assert reward_config_for(RewardConfig(), "files").verifier == "math"
    exact = reward_config_for(RewardConfig(), "synthetic")
    assert RewardFunction(exact).__call__(items).tolist() == [1.0, 0.0, 0.0]
    lenient = RewardFunction(RewardConfig(verifier="exact", require_finished=False, format_weight=0.25))
    assert lenient(items).tolist() == [1.25, 0.0, 0.25]  # exact still needs <eos>; format = finished
    assert lenient([]).shape == (0,)


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(RewardConfig(verifier="math", timeout_s=2.0, num_workers=2))
    yield v
    v.close()


# (response, reference, expected) : a correct and an incorrect answer of each supported form
FORMS = [
    ("The answer is \\boxed{42}.", "42", 1.0), ("The answer is \\boxed{41}.", "42", 0.0),            # integer
    ("so the total is 1234", "1234", 1.0), ("so the total is 1243", "1234", 0.0),                     # bare number
    ("\\boxed{-7}", "-7", 1.0), ("\\boxed{7}", "-7", 0.0),                                          # negative
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0), ("\\boxed{0.4}", "\\frac{1}{2}", 0.0),                     # decimal/fraction
    ("$\\frac{2}{4}$", "\\frac{1}{2}", 1.0), ("$\\frac{3}{4}$", "\\frac{1}{2}", 0.0),                 # fraction
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0), ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}", 0.0),             # radical
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0), ("\\boxed{(x-1)^2}", "x^2+2x+1", 0.0),                    # expression
    ("\\boxed{(1,2)}", "(1,2)", 1.0), ("\\boxed{(2,1)}", "(1,2)", 0.0),                               # tuple/interval
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1.0), ("\\boxed{\\pi}", "\\pi/2", 0.0),                   # constant
]


def test_math_verify_scores_each_form(verifier):
    items = [VerifyItem(r, ref) for r, ref, _ in FORMS]
    got = verifier.score(items)
    assert got.tolist() == [e for _, _, e in FORMS], [(f[0], f[1], g) for f, g in zip(FORMS, got)]
    assert verifier.stats.timeouts == 0


def test_pathological_answer_times_out_to_zero_and_is_logged(caplog):
    # 2.5 s: long enough that a loaded CI box never times out a normal answer, short for the hang
    v = MathVerifier(RewardConfig(verifier="math", timeout_s=2.5, num_workers=2))
    try:
        v.score([VerifyItem("\\boxed{1}", "1")])  # start the pool outside the timed call
        items = [VerifyItem("\\boxed{5}", "5"), VerifyItem(HANGS, "3"), VerifyItem("\\boxed{6}", "5"),
                 VerifyItem("\\boxed{9}", "9")]
        with caplog.at_level(logging.WARNING, logger="megatron_cropi.rewards.math_verifier"):
            t0 = time.monotonic()
            got = v.score(items)
            elapsed = time.monotonic() - t0
        assert got.tolist() == [1.0, 0.0, 0.0, 1.0]  # the others are scored, not zeroed with it
        assert elapsed < 2.5 + 10.0, elapsed  # one timeout + one pool restart, never the hang
        assert v.stats.timeouts == 1 and v.stats.restarts == 1
        assert "1 of 4 answers timed out after 2.5s" in caplog.text
        # the same from a worker thread (math-verify's own SIGALRM timeout would fail here)
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("r", v.score([VerifyItem(HANGS, "3"),
                                                                           VerifyItem("\\boxed{2}", "2")])))
        th.start()
        th.join(timeout=30)
        assert not th.is_alive() and box["r"].tolist() == [0.0, 1.0] and v.stats.timeouts == 2
    finally:
        v.close()


def crash_on_seven(response: str, reference: str) -> float:
    """Injected fault: a worker that dies (like a segfault) on one answer."""
    if response == "7":
        os._exit(3)
    return float(response == reference)


def test_crashing_worker_is_replaced_and_counted(caplog):
    v = MathVerifier(RewardConfig(verifier="math", timeout_s=5.0, num_workers=1), verify_fn=crash_on_seven)
    try:
        with caplog.at_level(logging.WARNING):
            got = v.score([VerifyItem("1", "1"), VerifyItem("7", "7"), VerifyItem("2", "2")])
        assert got.tolist() == [1.0, 0.0, 1.0]
        assert v.stats.errors == 1 and v.stats.restarts >= 2 and "failed to parse or verify" in caplog.text
    finally:
        v.close()


def test_math_reward_function_with_format_reward(verifier):
    fn = RewardFunction(RewardConfig(verifier="math", format_weight=0.1), verifier=verifier)
    got = fn([VerifyItem("\\boxed{3}", "3"), VerifyItem("3", "3"), VerifyItem("\\boxed{4}", "3"),
              VerifyItem("\\boxed{3}", "3", finished=False)])
    np.testing.assert_allclose(got, [1.1, 1.0, 0.1, 0.0])
