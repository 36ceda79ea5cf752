"""FLOPs per token for MFU: the dense-equivalent and the activated count."""

from __future__ import annotations

import pytest

from pretrain.config import ModelConfig
from pretrain.flops import training_flops_per_token


def test_seqboat_flops_by_hand() -> None:
    cfg = ModelConfig(layers=2, width=8, zdim=4, hdim=16, window=3)
    per_layer_always = 2 * 8 * 10  # hx + 2 routing logits
    gau = 2 * 8 * (4 + 32) + 2 * 16 * 8 + 2 * 4 * (4 + 16)  # projections + attention
    head = 2 * 8 * 100
    dense = training_flops_per_token(cfg, 100, 64)
    assert dense == 3 * (2 * (per_layer_always + gau) + head)
    half = training_flops_per_token(cfg, 100, 64, [0.5, 0.0])
    assert half == 3 * (2 * per_layer_always + 0.5 * gau + head)
    assert half < dense


@pytest.mark.parametrize(("routing", "ratio"), [("never", 0.0), ("always", 1.0)])
def test_ablations(routing: str, ratio: float) -> None:
    cfg = ModelConfig(layers=1, width=8, zdim=4, hdim=16, window=3, routing=routing)
    gau = 2 * 8 * (4 + 32) + 2 * 16 * 8 + 2 * 4 * (4 + 16)
    assert training_flops_per_token(cfg, 10, 64) == 3 * (2 * 8 * 8 + ratio * gau + 2 * 8 * 10)


def test_transformer_attention_grows_with_length() -> None:
    cfg = ModelConfig(arch="transformer", layers=1, width=8, transformer_ffn=32)
    short, long = (training_flops_per_token(cfg, 10, n) for n in (64, 128))
    assert long - short == 3 * 2 * 2 * 32 * 8  # 64 more keys at half weight per query
