"""The repository stands alone: no tracked text file points at a path outside it.

Design notes, calibration figures and paper facts the code relies on live in the repository itself
(``docs/design.md``); a reference to a folder beside the checkout, or to an absolute path of the machine
it was written on, would be a dead link for everyone else.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Spelled in pieces so that this file does not match itself.
_SHARED = "shared"
FORBIDDEN = {
    "a folder beside the repository": re.compile(re.escape("../" + _SHARED)),
    "the outside notes folder": re.compile(re.escape(_SHARED + "/reference")),
    "the outside design sketch": re.compile(re.escape(_SHARED + "/DES" + "IGN")),
    "an outside design document (the in-repo one is docs/design.md)": re.compile(re.escape("DES" + "IGN.md")),
    "an absolute path of the development machine": re.compile(re.escape("/" + "work/")),
}


def outside_references(text: str) -> list[tuple[int, str, str]]:
    """``(line number, what, line)`` for every line of ``text`` that points outside the repository."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                hits.append((number, what, line.strip()))
    return hits


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in out.decode("utf-8", "surrogateescape").split("\0"):
        path = ROOT / name
        if not name or not path.is_file() or path.is_symlink():
            continue  # deleted in the working tree, a submodule, or a link
        files.append(path)
    return files


def _read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (NUL bytes, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_no_tracked_text_file_points_outside_the_repository():
    files = _tracked_text_files()
    assert files, "git ls-files listed nothing"
    found = []
    for path in files:
        text = _read_text(path)
        if text is None:
            continue
        for number, what, line in outside_references(text):
            found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line[:120]}")
    assert not found, ("references to paths outside the repository (point to docs/design.md or another in-repo "
                       "file, or state the fact inline):\n  " + "\n  ".join(found))


def test_the_check_catches_each_kind_of_outside_reference():
    """The rule is not vacuous: each forbidden form is found, the in-repo design document is allowed."""
    bad = ["see ../" + _SHARED + "/notes.md", _SHARED + "/refer" + "ence/notes.md §3",
           _SHARED + "/DES" + "IGN.md", "DES" + "IGN.md §2", "/" + "work/main/README.md"]
    for line in bad:
        assert outside_references(line), line
    assert outside_references("\n".join(["ok", bad[0]]))[0][0] == 2
    for line in ["docs/design.md §4", "[`docs/design.md`](docs/design.md)", "the shared behaviour policy β",
                 "a filesystem shared by every rank", "homework/"]:
        assert not outside_references(line), line
