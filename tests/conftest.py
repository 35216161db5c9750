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

# torchrun's variables as the session found them. A test or module fixture that starts a one-process
# world in the pytest process (``init_distributed(allow_single=True)``) sets some of them, and a later
# test that launches a subprocess with this environment would pass them on; the order of tests in a
# process is not fixed (``pytest -n 2`` deals files to two workers), so every test ends with them as the
# session began.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SESSION_LAUNCH_ENV = {k: os.environ.get(k) for k in _LAUNCH_VARS}


@pytest.fixture(autouse=True)
def _launch_variables_restored():
    yield
    for k, v in _SESSION_LAUNCH_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
