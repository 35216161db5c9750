"""A new run reuses another run's behaviour rollouts when their identity matches, and only then.

Run A rolls β out (the tiny curriculum, stopped by an injected death in the first scoring chunk, after
its behaviour stores are complete). Run B, another output directory with
``curriculum.reuse_rollouts_from: A``, takes A's stores: no rollout time on its clock and stores equal to
A's file for file. Run C, the same but with another ``rollout.temperature``, rolls out again and says
why, naming ``temperature``. Finally ``--new-run`` in A's own directory (after a change that invalidates
finished work) reuses the stores of the run it moved aside.
"""

import json
from pathlib import Path

import pytest
import yaml

SETS = ("pool", "target-cmp")


def _write(tmp: Path, out: Path, **changes) -> Path:
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    path = tmp / f"cfg-{out.name}-{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(tiny_curriculum_config(str(out), **{"curriculum.stages": 1, **changes})))
    return path


def _run_until_scoring(cfg: Path, *extra):
    """``cropi run`` until the first scoring chunk is written (it dies there, exit 17)."""
    from megatron_cropi.testing.cli import run_cli

    rc, log = run_cli(["run", str(cfg), *extra], fault="score:chunk", timeout=300)
    assert rc == 17, log[-4000:]
    return log


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _clock(run: Path) -> dict:
    return json.loads((run / "state.json").read_text()).get("clock", {})


@pytest.mark.timeout(900)
def test_matching_stores_are_reused_and_mismatches_rolled_out(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")  # the log survives the injected death
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _run_until_scoring(_write(tmp_path, a))
    assert _clock(a).get("rollouts", 0) > 0
    ref = {s: _files(a / "rollouts" / s) for s in SETS}
    assert all(ref[s] and json.loads(ref[s]["manifest.json"])["complete"] for s in SETS)

    log = _run_until_scoring(_write(tmp_path, b, **{"curriculum.reuse_rollouts_from": str(a)}))
    for s in SETS:
        assert f"[rollouts] {s}: reused {a.resolve() / 'rollouts' / s}" in log, log[-3000:]
        assert _files(b / "rollouts" / s) == ref[s]  # the same store, byte for byte
    assert "rollouts" not in _clock(b)  # no rollout time charged

    log = _run_until_scoring(_write(tmp_path, c, **{"curriculum.reuse_rollouts_from": str(a),
                                                    "rollout.temperature": 0.7}))
    assert "[rollouts] pool: not reusing" in log and "sampling.temperature: store has 1.0, run expects 0.7" in log, \
        log[-3000:]
    assert "reused" not in log and _clock(c)["rollouts"] > 0
    header = json.loads((c / "rollouts" / "pool" / "header.json").read_text())
    assert header["sampling"]["temperature"] == 0.7

    # --new-run moves a's outputs aside; its stores still match and are reused
    log = _run_until_scoring(_write(tmp_path, a, **{"selection.ratio": 0.5}), "--new-run")
    aside = sorted(tmp_path.glob("a.prev-*"))
    assert len(aside) == 1, log[-3000:]
    for s in SETS:
        assert f"[rollouts] {s}: reused {aside[0].resolve() / 'rollouts' / s}" in log, log[-3000:]
        assert _files(a / "rollouts" / s) == ref[s]
    assert "rollouts" not in _clock(a)
