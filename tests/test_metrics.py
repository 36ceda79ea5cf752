"""The log window's figures: throughput over the whole window, not its last step."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.metrics import StepMetrics


def test_throughput_and_data_wait_average_over_the_log_window() -> None:
    cfg = load_config(
        None,
        [
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.seq_length=8",
            "model.window=8",
        ],
    )
    metrics = StepMetrics(cfg, padded_vocab=256, world_size=2)
    # Three steps; the last (the one that collects layer statistics) is the slow one.
    for loss, step_s, data_s in [(2.0, 1.0, 0.25), (float("nan"), 1.0, 0.25), (4.0, 2.0, 0.5)]:
        metrics.record(loss, step_s, data_s)
    out = metrics.summary(None, torch.device("cpu"))
    assert out["perf/tokens_per_s"] == pytest.approx(3 * 4 * 8 / 4.0)  # not 32 / 2.0
    assert out["perf/tokens_per_s_per_rank"] == pytest.approx(3 * 4 * 8 / 4.0 / 2)
    assert out["train/step_time_s"] == pytest.approx(4.0 / 3)
    assert out["train/data_wait_fraction"] == pytest.approx(1.0 / 4.0)
    assert out["train/loss"] == pytest.approx(3.0)  # the non-finite step left out
    # A new window starts empty.
    metrics.record(1.0, 0.5, 0.0)
    again = metrics.summary(None, torch.device("cpu"))
    assert again["perf/tokens_per_s"] == pytest.approx(32 / 0.5)
    assert math.isclose(again["train/loss"], 1.0)
