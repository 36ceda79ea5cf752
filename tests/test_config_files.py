"""The shipped configs load, and tiny.yaml is exactly the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_tiny_yaml_is_the_embedded_default() -> None:
    assert load_config(CONFIGS / "tiny.yaml") == load_config()


@pytest.mark.parametrize("name", ["tiny", "enwik8", "125m", "350m"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.run.name and cfg.model.window <= cfg.train.seq_length


def test_enwik8_is_the_papers_model() -> None:
    m = load_config(CONFIGS / "enwik8.yaml").model
    assert (m.layers, m.width, m.hdim, m.zdim, m.window) == (14, 616, 1232, 128, 1024)
    assert (m.position, m.attention_fn, m.ffn_hidden, m.final_norm_affine) == (
        "rotary", "softmax", 0, False
    )  # fmt: skip
