"""PromptStream: seeded shuffled epochs, exact resume from a saved position, prompt-set swaps."""

import numpy as np
import pytest

from megatron_cropi.grpo.data import PromptStream
from megatron_cropi.records import PromptRecord


def _prompts(n, tag="p"):
    return [PromptRecord(prompt_id=f"{tag}{i}", token_ids=np.array([i], dtype=np.int32), answer="") for i in range(n)]


def test_epochs_are_permutations_and_resume_exactly():
    stream = PromptStream(_prompts(10), seed=4)
    first = [p.prompt_id for p in stream.next_batch(10)]
    assert sorted(first) == sorted(f"p{i}" for i in range(10)) and first != [f"p{i}" for i in range(10)]
    stream.next_batch(3)  # crosses into epoch 1
    state = stream.state_dict()
    rest = [p.prompt_id for p in stream.next_batch(12)]  # crosses into epoch 2
    resumed = PromptStream(_prompts(10), seed=4)
    resumed.load_state_dict(state)
    assert [p.prompt_id for p in resumed.next_batch(12)] == rest
    other_seed = PromptStream(_prompts(10), seed=5)
    assert [p.prompt_id for p in other_seed.next_batch(10)] != first


def test_swapping_the_prompt_set_and_refusing_a_foreign_position():
    stream = PromptStream(_prompts(10), seed=0)
    stream.next_batch(4)
    state = stream.state_dict()
    stream.set_prompts(_prompts(3, tag="s"))
    assert {p.prompt_id for p in stream.next_batch(3)} == {"s0", "s1", "s2"}
    with pytest.raises(ValueError, match="saved data position is for prompt set"):
        stream.load_state_dict(state)
    with pytest.raises(ValueError, match="empty"):
        stream.set_prompts([])


def test_a_shuffled_set_draws_the_same_batches_however_it_is_listed():
    """A background stage's pool before its switch (the pool's order) and a ``full`` stage's selection (prompt-id
    order) are one set: the same seed must give them the same batches (a paired comparison of the two)."""
    listed = _prompts(12)
    reordered = list(reversed(listed[:5])) + listed[5:][::2] + listed[5:][1::2]
    a, b = PromptStream(listed, seed=7), PromptStream(reordered, seed=7)
    assert [p.prompt_id for p in a.next_batch(30)] == [p.prompt_id for p in b.next_batch(30)]
    assert a.state_dict() == b.state_dict()
    # unshuffled, the stream visits the set in the order it was given
    plain = PromptStream(reordered, seed=7, shuffle=False)
    assert [p.prompt_id for p in plain.next_batch(12)] == [p.prompt_id for p in reordered]
