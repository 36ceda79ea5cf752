"""The spike guard (pretrain/spike_guard.py, ``train.spike_guard``) skips a loss spike and
counts it, and changes nothing on a run without spikes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.monitor import read_metrics
from pretrain.spike_guard import SpikeGuard
from pretrain.train import Trainer
from tests.test_train import small_config

GUARD = ["train.spike_guard=6", "train.spike_window=6", "train.max_steps=10"]
SPIKE_AT = 9  # the step (1-based) whose loss is multiplied by 100


def test_statistics_start_with_a_full_window() -> None:
    guard = SpikeGuard(k=3, window=4)
    for value in (1.0, 1.1, 0.9):
        assert not guard.is_spike(100.0, 100.0)  # too little history: never a spike
        guard.record(value, value)
    guard.record(1.0, 1.0)  # mean 1.0, std ~0.07: the threshold is ~1.21
    assert not guard.is_spike(1.2, 1.0) and guard.is_spike(1.25, 1.0)
    assert guard.is_spike(1.0, 1.25) and not guard.is_spike(1.0)  # the norm, when known
    restored = SpikeGuard(k=3, window=4)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() == {
        "losses": [1.0, 1.1, 0.9, 1.0], "norms": [1.0, 1.1, 0.9, 1.0],
    }  # fmt: skip


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_a_spike_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(small_config(tmp_path, *GUARD), progress=False)
    real_loss, real_step = trainer.model.loss, trainer.train_step

    def loss(*args, **kwargs):
        value, stats = real_loss(*args, **kwargs)
        return (value * 100 if trainer.step == SPIKE_AT - 1 else value), stats

    changed = {}

    def step(collect_stats: bool):
        before = weights(trainer)
        result = real_step(collect_stats)
        after = weights(trainer)
        changed[trainer.step + 1] = any(not torch.equal(before[k], after[k]) for k in before)
        return result

    monkeypatch.setattr(trainer.model, "loss", loss)
    monkeypatch.setattr(trainer, "train_step", step)
    trainer.train()
    assert changed == {s: s != SPIKE_AT for s in range(1, 11)}
    assert trainer.skipped_steps == trainer.state.spike_steps == 1
    logged = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r}
    assert [logged[s]["train/spike_steps"] for s in range(1, 11)] == [0] * 8 + [1, 1]


def test_without_spikes_the_guard_changes_nothing(tmp_path: Path) -> None:
    guarded = Trainer(small_config(tmp_path / "guarded", *GUARD), progress=False)
    guarded.train()
    plain = Trainer(small_config(tmp_path / "plain", "train.max_steps=10"), progress=False)
    plain.train()
    assert guarded.skipped_steps == 0
    a, b = weights(guarded), weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)
