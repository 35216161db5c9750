"""Test tiers:

* ``tests/unit``: no processes, no devices; milliseconds to seconds.
* ``tests/distributed``: real megatron-core on gloo, 2-4 spawned ranks (``megatron_cropi.testing.spawn``).
* ``tests/gpu``: marked ``gpu``; skipped without CUDA.
"""

import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
