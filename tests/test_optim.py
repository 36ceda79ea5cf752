"""Schedule, gradient accumulation, optimizers and precision of the training step."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from pretrain.build import lr_at
from pretrain.config import OptimizerConfig, load_config
from pretrain.train import Trainer
from tests.test_train import small_config


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
