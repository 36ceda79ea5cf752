"""The training loop, checkpoints and resume, in-process on tiny models."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    load_latest,
    save_checkpoint,
)
from pretrain.config import Config, ConfigError, load_config
from pretrain.monitor import read_metrics
from pretrain.train import NonFiniteLossError, Preempted, Trainer


def small_config(run_dir: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"run.dir={run_dir}",
            "wandb.mode=disabled",
            "data.tokenizer.kind=byte",
            "data.shuffle_buffer=8",
            "model.layers=2",
            "model.width=32",
            "model.zdim=8",
            "model.hdim=32",
            "model.window=8",
            "model.dropout=0.1",
            "model.attention_dropout=0.1",
            "train.seq_length=32",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "train.max_steps=8",
            "train.log_interval=1",
            "train.eval_interval=4",
            "train.eval_samples=4",
            "optimizer.warmup_steps=2",
            "checkpoint.interval=4",
            *overrides,
        ],
    )


def train_losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["train/loss"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "train/loss" in r
    }


def test_resume_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2N steps straight == N steps, stop (by signal, as a preemption would), resume, N steps."""
    straight = Trainer(small_config(tmp_path / "a"), progress=False)
    straight.train()

    original = Trainer.train_step

    def signal_during_step_3(self: Trainer, collect_stats: bool):
        if self.step == 2:  # while step 3 runs: the stop takes effect when it ends
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, collect_stats)

    monkeypatch.setattr(Trainer, "train_step", signal_during_step_3)
    sigterm = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        Trainer(small_config(tmp_path / "b"), progress=False).train()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # on its way out: no SIGTERM
    signal.signal(signal.SIGTERM, sigterm)
    assert stopped.value.step == 3
    assert [p.name for p in complete_checkpoints(tmp_path / "b")] == ["step_00000003"]
    monkeypatch.setattr(Trainer, "train_step", original)

    resumed = Trainer(small_config(tmp_path / "b"), progress=False)
    assert resumed.step == 3 and resumed.restarts == 1
    resumed.train()
    logged = read_metrics(tmp_path / "b" / "metrics.jsonl")
    restarts = {r["step"]: r["run/restarts"] for r in logged if "run/restarts" in r}
    assert restarts == {s: int(s > 3) for s in range(1, 9)}
    perf = [r for r in logged if "perf/tokens_per_s" in r]
    assert perf and all(0 < r["perf/tflops_activated"] <= r["perf/tflops_dense"] for r in perf)
    assert all(r["perf/max_memory_mib"] > 0 for r in perf)
    assert [r["step"] for r in logged if "checkpoint/save_s" in r] == [3, 4, 8]

    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert list(b) == list(range(1, 9)) and a == b  # bit for bit, every step
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert straight.run_id != resumed.run_id  # two runs; the resumed one kept its own id
    assert resumed.run_id == load_latest(tmp_path / "b")[0]["train"]["run_id"]


def test_resume_refuses_a_changed_model(tmp_path: Path) -> None:
    Trainer(small_config(tmp_path, "train.max_steps=4"), progress=False).train()
    with pytest.raises(ConfigError, match=r"model\.width: 32 -> 48"):
        Trainer(small_config(tmp_path, "model.width=48"), progress=False)
    # Changing only the step budget continues the run.
    more = Trainer(small_config(tmp_path, "train.max_steps=6"), progress=False)
    assert more.step == 4


def test_nonfinite_loss_skips_steps_then_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small_config(tmp_path, "train.max_nonfinite_in_a_row=3", "train.max_steps=20")
    trainer = Trainer(cfg, progress=False)
    real_loss = trainer.model.loss
    calls = {"n": 0}

    def sometimes_nan(tokens: torch.Tensor, collect_stats: bool = False):
        calls["n"] += 1
        loss, stats = real_loss(tokens, collect_stats)
        # Step 2 (micro-batches 3-4) is poisoned once; from step 5 on, every step.
        poisoned = calls["n"] in (3, 4) or calls["n"] > 8
        return (loss * float("nan") if poisoned else loss), stats

    monkeypatch.setattr(trainer.model, "loss", sometimes_nan)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer.train()
    assert trainer.skipped_steps == 4
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_checkpoint_keeps_last_k_and_falls_back_from_a_corrupt_one(tmp_path: Path, capsys) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": torch.full((4,), float(step))}, keep_last=2)
    names = [p.name for p in complete_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000003"]
    state, path = load_latest(tmp_path)
    assert path.name == "step_00000003" and state["x"][0] == 3
    # Truncate the newest rank file: its checksum fails and the previous one loads.
    rank_file = path / "rank_00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:-10])
    state, path = load_latest(tmp_path)
    assert path.name == "step_00000002" and state["x"][0] == 2
    assert "checksum mismatch" in capsys.readouterr().err
    (path / "rank_00000.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path)


def test_an_interrupted_save_is_invisible(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)})
    # A save killed before its rename leaves a .tmp folder and no meta in a published one.
    partial = tmp_path / "checkpoints" / "step_00000002.tmp"
    partial.mkdir()
    (partial / "rank_00000.pt").write_bytes(b"half")
    _, path = load_latest(tmp_path)
    assert path.name == "step_00000001"
    save_checkpoint(tmp_path, 2, {"x": torch.ones(1)})  # the retry replaces the leftover
    assert load_latest(tmp_path)[1].name == "step_00000002"


def test_activation_heat_maps_go_to_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = small_config(tmp_path, "wandb.mode=offline", "train.heatmap_interval=2")
    cfg.train.max_steps = 4
    Trainer(cfg, progress=False).train()
    assert sorted(p.name for p in (tmp_path / "plots").glob("activation_*.png")) == [
        "activation_00000002.png", "activation_00000004.png"
    ]  # fmt: skip
    logged = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/activation_*.png"))
    assert len(logged) == 2


def test_profile_window_writes_a_chrome_trace(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "train.max_steps=4", "train.profile_steps=[2, 3]")
    Trainer(cfg, progress=False).train()
    (trace,) = (tmp_path / "profile").iterdir()
    assert trace.name == "rank_00000_steps_2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::mm") for n in names)  # the model's work was recorded
    # Steps 2 and 3, not the whole run: one optimizer step each.
    assert sum(e.get("name", "").startswith("Optimizer.step#AdamW.step") for e in events) == 2
    with pytest.raises(ConfigError, match="profile_steps"):
        small_config(tmp_path, "train.profile_steps=[3, 2]")
