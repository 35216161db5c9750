"""MetricsLogger writes TensorBoard scalars on the metrics rank only; read_scalars reads them back."""

import math

import pytest

from megatron_cropi.metrics import MetricsLogger, read_scalars


def test_scalars_round_trip(tmp_path):
    with MetricsLogger(tmp_path / "tb") as logger:
        for step in range(1, 4):
            logger.log(step, {"reward": 0.1 * step, "kl": 1e-3, "lr": 3e-4, "bad": math.nan, "note": "text"},
                       prefix="train")
        logger.log(3, {"pass_rate": 0.5}, prefix="eval")
    assert logger.skipped_values == 3
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == {"train/reward", "train/kl", "train/lr", "eval/pass_rate"}
    assert scalars["train/reward"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert scalars["eval/pass_rate"] == [(3, 0.5)]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "tb", enabled=False)
    logger.log(1, {"reward": 1.0})
    logger.close()
    assert not (tmp_path / "tb").exists()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        read_scalars(tmp_path / "tb")
