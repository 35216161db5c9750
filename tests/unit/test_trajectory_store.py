"""Trajectory store: round trip in prompt-id order, atomic commits (a SIGKILLed writer loses no
committed part), resume, header mismatch and truncated/corrupt parts detected on reopen."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_cropi.data.prompt_ids import pool_hash, prompt_id
from megatron_cropi.rollout.store import StoreError, StoreHeader, TrajectoryStore
from megatron_cropi.records import PromptRecord, Response, RolloutGroup, SamplingParams


def make_groups(n: int, k: int = 3, seed: int = 0, start: int = 0) -> list[RolloutGroup]:
    rng = np.random.default_rng(seed + start)
    out = []
    for i in range(start, start + n):
        text, answer = f"q{i}", str(i)
        prompt = PromptRecord(prompt_id(text, answer), rng.integers(0, 30, 5 + i % 3).astype(np.int32), answer,
                              source=f"fam{i % 2}", text=text, meta={"row": i})
        responses = tuple(Response(rng.integers(0, 30, 1 + (i + j) % 4).astype(np.int32),
                                   rng.normal(size=1 + (i + j) % 4).astype(np.float32), finished=bool(j % 2))
                          for j in range(k))
        out.append(RolloutGroup(prompt, responses, rng.integers(0, 2, k).astype(np.float32), policy_version=3))
    return out


def header_for(groups, **overrides) -> StoreHeader:
    kw = dict(tokenizer="char:test", model="hf:test:abc", policy_version=3,
              pool_hash=pool_hash(g.prompt_id for g in groups), num_prompts=len(groups))
    kw.update(overrides)
    return StoreHeader.build(SamplingParams(n=3, temperature=0.7), **kw)


def assert_same_group(a: RolloutGroup, b: RolloutGroup):
    assert a.prompt_id == b.prompt_id and a.prompt.answer == b.prompt.answer and a.prompt.text == b.prompt.text
    assert a.prompt.source == b.prompt.source and a.prompt.meta == b.prompt.meta
    assert a.prompt.token_ids.tolist() == b.prompt.token_ids.tolist() and b.prompt.token_ids.dtype == np.int32
    assert a.rewards.tolist() == b.rewards.tolist() and a.policy_version == b.policy_version
    for ra, rb in zip(a.responses, b.responses, strict=True):
        assert ra.token_ids.tolist() == rb.token_ids.tolist() and ra.finished == rb.finished
        np.testing.assert_array_equal(ra.logprobs, rb.logprobs)
        assert rb.token_ids.dtype == np.int32 and rb.logprobs.dtype == np.float32


def test_round_trip_in_prompt_id_order(tmp_path):
    groups = make_groups(25)
    store = TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups))
    for start in range(0, 25, 10):
        store.append(groups[start:start + 10])
    store.mark_complete()
    back = TrajectoryStore.open(tmp_path / "s", expect=header_for(groups))
    assert back.complete and len(back) == 25 and groups[7].prompt_id in back
    ids = [g.prompt_id for g in back.iter_groups()]
    assert ids == sorted(g.prompt_id for g in groups) == back.prompt_ids()
    by_id = {g.prompt_id: g for g in groups}
    for g in back.iter_groups():
        assert_same_group(by_id[g.prompt_id], g)
    assert_same_group(groups[13], back.get(groups[13].prompt_id))
    assert back.header.sampling_params == SamplingParams(n=3, temperature=0.7)
    with pytest.raises(KeyError, match="not in the trajectory store"):
        back.get("nope")
    with pytest.raises(StoreError, match="read-only"):
        back.append(make_groups(1, start=99))
    with pytest.raises(StoreError, match="already stored"):
        TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups)).append(groups[:1])


def test_resume_skips_committed_prompts_and_header_mismatch_names_both_values(tmp_path):
    groups = make_groups(12)
    store = TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups))
    store.append(groups[:5])
    again = TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups))
    assert again.done_ids() == {g.prompt_id for g in groups[:5]} and not again.complete
    with pytest.raises(StoreError, match="complete"):
        again.mark_complete()
    with pytest.raises(StoreError, match=r"sampling\.n: store has 3, run expects 4"):
        TrajectoryStore.open_for_append(tmp_path / "s", StoreHeader.build(
            SamplingParams(n=4, temperature=0.7), tokenizer="char:test", model="hf:test:abc", policy_version=3,
            pool_hash=header_for(groups).pool_hash, num_prompts=12))
    with pytest.raises(StoreError, match="pool_hash: store has '.*', run expects '.*'"):
        TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups[:6]))
    with pytest.raises(StoreError, match="model: store has 'hf:test:abc', run expects 'hf:other'"):
        TrajectoryStore.open(tmp_path / "s", expect=header_for(groups, model="hf:other"))


def test_truncated_or_corrupt_part_is_detected_by_checksum_on_reopen(tmp_path):
    groups = make_groups(9)
    store = TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups))
    for start in range(0, 9, 3):
        store.append(groups[start:start + 3])
    part = tmp_path / "s" / "parts" / "part-000001.arrow"
    data = part.read_bytes()
    part.write_bytes(data[:-100])  # truncated
    with pytest.raises(StoreError, match=r"part-000001\.arrow: size .* recorded .*truncated or corrupt"):
        TrajectoryStore.open(tmp_path / "s")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(flipped))  # same size, one byte changed
    with pytest.raises(StoreError, match=r"part-000001\.arrow: checksum .* does not match"):
        TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups))
    # repair drops the bad part; its prompts are rolled out again into a part with a fresh number
    repaired = TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups), repair=True)
    assert repaired.done_ids() == {g.prompt_id for g in groups[:3] + groups[6:]}
    repaired.append(groups[3:6])
    assert sorted(p.name for p in (tmp_path / "s" / "parts").iterdir()) == [
        "part-000000.arrow", "part-000002.arrow", "part-000003.arrow"]
    final = TrajectoryStore.open(tmp_path / "s")
    assert len(final) == 9
    assert_same_group(groups[4], final.get(groups[4].prompt_id))


def test_truncated_manifest_names_the_file(tmp_path):
    groups = make_groups(2)
    TrajectoryStore.open_for_append(tmp_path / "s", header_for(groups)).append(groups)
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])
    with pytest.raises(StoreError, match="manifest.json: cannot read"):
        TrajectoryStore.open(tmp_path / "s")


_WRITER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_trajectory_store import make_groups, header_for
from megatron_cropi.rollout.store import TrajectoryStore
groups = make_groups(400, k=8)
store = TrajectoryStore.open_for_append({path!r}, header_for(groups))
done = store.done_ids()
todo = [g for g in groups if g.prompt_id not in done]
print("ready", flush=True)
for start in range(0, len(todo), 4):
    store.append(todo[start:start + 4])
"""


def test_sigkilled_writer_loses_no_committed_part_and_resumes(tmp_path):
    path = str(tmp_path / "s")
    script = _WRITER.format(tests=os.path.dirname(__file__), path=path)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill it mid-run, once a few parts are committed
        manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
        if len(manifest["parts"]) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    groups = make_groups(400, k=8)
    store = TrajectoryStore.open_for_append(path, header_for(groups))  # verifies every committed part
    committed = len(store)
    assert 12 <= committed < 400 and committed % 4 == 0
    assert not any(p.name.startswith(".") for p in (tmp_path / "s" / "parts").iterdir())  # strays removed
    store.append([g for g in groups if g.prompt_id not in store])  # resume
    store.mark_complete()
    final = TrajectoryStore.open(path)
    by_id = {g.prompt_id: g for g in groups}
    for g in final.iter_groups():
        assert_same_group(by_id[g.prompt_id], g)
    assert len(final) == 400
