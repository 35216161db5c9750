"""Injected faults: named points where a test makes the process die as a SIGKILL would.

``CROPI_FAULT_AT=<point>`` in the environment kills the process (exit 17, no clean-up) when the run
reaches that point; the resume tests restart it and compare the end state with an uninterrupted run.
Points: ``rollouts:<set>``, ``refresh:<set>``, ``score:chunk``, ``online_rollouts``, ``select``, ``train:step`` and ``background:switch`` (right after a background stage
recorded its switch).
"""

from __future__ import annotations

import os

__all__ = ["fault_point"]


def fault_point(name: str) -> None:
    """Die here, as a SIGKILL would, if ``CROPI_FAULT_AT`` names this point (injected faults only)."""
    if os.environ.get("CROPI_FAULT_AT") == name:
        os._exit(17)
