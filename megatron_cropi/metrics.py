"""TensorBoard scalars written by one rank, and reading them back.

    logger = MetricsLogger(run_dir / "tensorboard", enabled=groups.is_metrics_rank)
    logger.log(step, {"reward": 0.4, "kl": 1e-3}, prefix="train")
    logger.close()
    read_scalars(run_dir / "tensorboard")["train/reward"]   # [(step, value), ...]

Only the metrics rank (the first TP and DP rank of the last pipeline stage, where losses live) writes;
every other rank's logger is a no-op, so callers never branch on the rank. Non-finite values are
skipped (TensorBoard would plot them as gaps anyway) and counted in ``skipped_values``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["MetricsLogger", "read_scalars"]


class MetricsLogger:
    """A ``torch.utils.tensorboard.SummaryWriter`` on the metrics rank, nothing elsewhere.

    Args:
        log_dir: event-file directory (created on the metrics rank).
        enabled: whether this rank writes (pass ``groups.is_metrics_rank``).
        flush_secs: how often TensorBoard flushes pending events.
    """

    def __init__(self, log_dir: str | Path, *, enabled: bool = True, flush_secs: int = 10):
        self.log_dir = Path(log_dir)
        self.enabled = bool(enabled)
        self.skipped_values = 0
        self._writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log(self, step: int, values: Mapping[str, float], *, prefix: str = "") -> None:
        """Write each finite scalar of ``values`` at ``step`` as ``{prefix}/{name}``."""
        if self._writer is None:
            return
        for name, value in values.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                self.skipped_values += 1
                continue
            self._writer.add_scalar(f"{prefix}/{name}" if prefix else name, v, global_step=int(step))

    def histogram(self, step: int, tag: str, values) -> None:
        """A histogram of ``values`` under ``tag`` at ``step`` (no-op when disabled)."""
        if self._writer is not None and len(values):
            self._writer.add_histogram(tag, np.asarray(values), global_step=int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files under ``log_dir``: ``{tag: [(step, value), ...]}`` by step.

    Raises:
        FileNotFoundError: no event file under ``log_dir``.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{log_dir}: no TensorBoard event files")
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()[SCALARS]:
            out.setdefault(tag, []).extend((e.step, float(e.value)) for e in acc.Scalars(tag))
    return {tag: sorted(v) for tag, v in out.items()}
