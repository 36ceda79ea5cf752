"""Schedule, gradient accumulation, optimizers and precision of the training step."""

from __future__ import annotations

import itertools
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from pretrain.build import lr_at, wsd_decay_start
from pretrain.config import ConfigError, OptimizerConfig, load_config
from pretrain.train import Preempted, Trainer
from tests.test_train import small_config, train_losses


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_min_lr(decay: str) -> None:
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay=decay)
    lrs = [lr_at(step, cfg, max_steps=110) for step in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    if decay == "constant":
        assert all(lr == 1.0 for lr in lrs[10:])
        return
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # monotone decay
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)  # reaches min_lr at the end
    halfway = lr_at(60, cfg, 110)
    assert halfway == pytest.approx(0.55)  # cosine and linear agree at the midpoint
    quarter = lr_at(35, cfg, 110)
    expected = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi / 4)) if decay == "cosine" else 0.75)
    assert quarter == pytest.approx(expected)


def test_gradient_accumulation_equals_one_big_micro_batch(tmp_path: Path) -> None:
    """4 samples as 4 micro-batches of 1 or 1 micro-batch of 4: the same step (fp64)."""
    results = []
    for micro in (1, 4):
        cfg = small_config(
            tmp_path / f"mb{micro}", f"train.micro_batch_size={micro}", "train.precision=fp64",
            "model.dropout=0", "model.attention_dropout=0", "train.max_steps=3",
        )  # fmt: skip
        trainer = Trainer(cfg, progress=False)
        losses = [trainer.train_step(collect_stats=False)[:2] for _ in range(3)]
        results.append((losses, trainer.model.state_dict()))
    (losses_a, state_a), (losses_b, state_b) = results
    for (la, ga), (lb, gb) in zip(losses_a, losses_b, strict=True):
        assert la == pytest.approx(lb, rel=1e-12) and ga == pytest.approx(gb, rel=1e-10)
    for name, tensor in state_a.items():
        torch.testing.assert_close(tensor, state_b[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("overrides", [["optimizer.name=radam"], ["train.precision=bf16"]])
def test_other_optimizer_and_precision_train(tmp_path: Path, overrides: list[str]) -> None:
    trainer = Trainer(small_config(tmp_path, "train.max_steps=24", *overrides), progress=False)
    first = trainer.evaluate()["loss"]
    result = trainer.train()
    assert math.isfinite(result.val["loss"]) and result.val["loss"] < first - 0.15
    if "train.precision=bf16" in overrides:  # autocast: fp32 master weights
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    else:
        assert isinstance(trainer.optimizer, torch.optim.RAdam)


def test_bf16_training_follows_the_fp32_curve(tmp_path: Path) -> None:
    """The tiny model (the embedded default config; batches of 4 x 128 tokens to keep CPU
    bf16 quick), 50 steps from the same weights and batches: bf16 autocast (fp32 master
    weights, the EMA in fp32) stays on the fp32 loss curve. Measured: at most 1.4e-4
    relative (1.3e-4 with the EMA left to autocast: at this size the curve does not show
    the EMA's rounding; tests/model/test_ema.py does)."""
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(
            None,
            [
                f"run.dir={tmp_path / precision}", "wandb.mode=disabled",
                f"data.tokenizer.path={tmp_path / 'tokenizer.model'}",
                f"train.precision={precision}", "train.max_steps=50",
                "train.global_batch_size=4", "train.micro_batch_size=4", "train.seq_length=128",
            ],
        )  # fmt: skip
        trainer = Trainer(cfg, progress=False)
        curves[precision] = [trainer.train_step(collect_stats=False).loss for _ in range(50)]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-1] < fp32[0] - 1.0  # it learned: the comparison is not of two flat lines
    gaps = [abs(a - b) / b for a, b in zip(bf16, fp32, strict=True)]
    assert max(gaps) < 2e-3, max(gaps)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_schedule_closed_form(shape: str) -> None:
    """Warmup, stable at lr, then the last 25% of the steps decaying to min_lr."""
    cfg = OptimizerConfig(
        lr=1.0, min_lr=0.1, warmup_steps=10, decay="wsd", decay_fraction=0.25, decay_shape=shape
    )
    assert wsd_decay_start(cfg, 100) == 75
    decay = {
        "linear": lambda x: 1 - x,
        "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
        "1-sqrt": lambda x: 1 - math.sqrt(x),
    }[shape]
    for step in range(101):
        if step < 10:
            expected = (step + 1) / 10
        elif step < 75:
            expected = 1.0
        else:
            expected = 0.1 + 0.9 * decay(min(1.0, (step - 75) / 25))
        assert lr_at(step, cfg, 100) == pytest.approx(expected, abs=1e-12), step
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)


WSD = ["optimizer.decay=wsd", "optimizer.decay_fraction=0.25", "checkpoint.interval=3"]


def test_wsd_run_extends_from_a_stable_checkpoint_as_if_planned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 steps planned (decay from step 9), stopped at step 6, resumed with 20 steps
    (decay from step 15): the same losses, bit for bit, as 20 steps planned from the start.
    A run stopped inside its decay (step 12) cannot be extended: one clear error, and the run
    directory keeps its config."""
    long = small_config(tmp_path / "long", *WSD, "train.max_steps=20")
    Trainer(long, progress=False).train()

    original = Trainer.train_step

    def stop_at_6(self: Trainer, collect_stats: bool):
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, collect_stats)

    monkeypatch.setattr(Trainer, "train_step", stop_at_6)
    sigterm = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted):
        Trainer(small_config(tmp_path / "ext", *WSD, "train.max_steps=12"), progress=False).train()
    signal.signal(signal.SIGTERM, sigterm)
    monkeypatch.setattr(Trainer, "train_step", original)
    extended = Trainer(small_config(tmp_path / "ext", *WSD, "train.max_steps=20"), progress=False)
    assert extended.step == 6
    extended.train()
    a, b = train_losses(tmp_path / "long"), train_losses(tmp_path / "ext")
    assert list(a) == list(range(1, 21)) and a == b  # bit for bit, every step

    Trainer(small_config(tmp_path / "done", *WSD, "train.max_steps=12"), progress=False).train()
    saved = (tmp_path / "done" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"past the decay start 9"):
        Trainer(small_config(tmp_path / "done", *WSD, "train.max_steps=20"), progress=False)
    assert (tmp_path / "done" / "config.yaml").read_text() == saved


def test_resume_refuses_a_changed_schedule(tmp_path: Path) -> None:
    """The schedule of the steps already taken is part of the run: lr, warmup, decay."""
    Trainer(small_config(tmp_path, *WSD, "train.max_steps=4"), progress=False).train()
    for change, message in [
        ("optimizer.lr=0.01", r"optimizer\.lr"),
        ("optimizer.decay_fraction=0.5", r"optimizer\.decay_fraction: 0\.25 -> 0\.5"),
        ("optimizer.decay=cosine", r"optimizer\.decay: 'wsd' -> 'cosine'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Trainer(small_config(tmp_path, *WSD, "train.max_steps=4", change), progress=False)


@pytest.mark.slow
def test_compiled_training_step_equals_eager(tmp_path: Path) -> None:
    """train.compile (torch.compile with dynamic shapes): the same losses and weights as the
    eager step, to float32 round-off (inductor fuses and reorders the arithmetic)."""
    runs = {}
    for compiled in (False, True):
        cfg = small_config(
            tmp_path / str(compiled), f"train.compile={str(compiled).lower()}",
            "model.dropout=0", "model.attention_dropout=0", "train.max_steps=4",
        )  # fmt: skip
        trainer = Trainer(cfg, progress=False)
        losses = [trainer.train_step(collect_stats=False).loss for _ in range(4)]
        runs[compiled] = losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}
    (eager, eager_state), (compiled, compiled_state) = runs[False], runs[True]
    assert compiled == pytest.approx(eager, rel=1e-5)
    for name, tensor in eager_state.items():
        torch.testing.assert_close(compiled_state[name], tensor, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r"train\.compile"):
        small_config(tmp_path, "train.compile=true", "parallel.tensor=2")
