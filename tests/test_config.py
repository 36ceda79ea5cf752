"""Config loading: defaults, YAML files, dotted overrides, type checks and validation."""

from __future__ import annotations

import dataclasses

import pytest

from pretrain.config import (
    Config,
    ConfigError,
    ModelConfig,
    SourceConfig,
    TrainConfig,
    apply_override,
    config_from_dict,
    load_config,
    validate,
)

YAML = """\
run:
  name: unit
model:
  width: 64
  layers: 2
  position: simple
train:
  seq_length: 128
optimizer:
  lr: 0.001
data:
  sources:
    - builtin: pydoc
    - path: corpus/*.txt
      weight: 0.5
"""


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ defaults and files


def test_defaults_load_and_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model == ModelConfig()
    assert cfg.train == TrainConfig()
    assert cfg.data.sources == [SourceConfig(builtin="pydoc")]
    validate(cfg)
    validate(Config())
    # the saved form round-trips
    assert config_from_dict(cfg.to_dict()) == cfg


def test_yaml_file(yaml_file):
    cfg = load_config(yaml_file)
    assert cfg.run.name == "unit"
    assert (cfg.model.width, cfg.model.layers, cfg.model.position) == (64, 2, "simple")
    assert cfg.train.seq_length == 128
    assert cfg.optimizer.lr == 0.001
    assert len(cfg.data.sources) == 2
    assert cfg.data.sources[1] == SourceConfig(path="corpus/*.txt", weight=0.5)
    # untouched keys keep their defaults
    assert cfg.model.zdim == ModelConfig().zdim
    assert cfg.train.micro_batch_size == TrainConfig().micro_batch_size
    assert str(cfg.run_dir).endswith("unit")


def test_empty_yaml_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == load_config()


# ------------------------------------------------------------------------- overrides


def test_nested_overrides_win_over_file(yaml_file):
    cfg = load_config(yaml_file, ["model.width=32", "optimizer.beta2=0.95", "run.name=other"])
    assert cfg.model.width == 32
    assert cfg.model.layers == 2  # from the file
    assert cfg.optimizer.beta2 == 0.95
    assert cfg.run.name == "other"


def test_override_list_item_from_file(yaml_file):
    cfg = load_config(yaml_file, ["data.sources.1.weight=2", "data.sources.0.split=validation"])
    assert cfg.data.sources[1].weight == 2.0 and isinstance(cfg.data.sources[1].weight, float)
    assert cfg.data.sources[1].path == "corpus/*.txt"  # the rest of the item is kept
    assert cfg.data.sources[0].split == "validation"


def test_override_list_item_of_default_config():
    """``seqboat train data.sources.0.weight=2`` with no file: the default list has one item."""
    cfg = load_config(overrides=["data.sources.0.weight=2"])
    assert cfg.data.sources == [SourceConfig(builtin="pydoc", weight=2.0)]


@pytest.mark.parametrize(
    "override,get,expected",
    [
        ("train.max_steps=42", lambda c: c.train.max_steps, 42),
        ("optimizer.lr=0.0005", lambda c: c.optimizer.lr, 0.0005),
        ("optimizer.lr=1e-3", lambda c: c.optimizer.lr, 1e-3),
        ("optimizer.min_lr=3e-5", lambda c: c.optimizer.min_lr, 3e-5),
        ("optimizer.weight_decay=0", lambda c: c.optimizer.weight_decay, 0.0),
        ("model.act_bias=-2.5", lambda c: c.model.act_bias, -2.5),
        ("model.prenorm=false", lambda c: c.model.prenorm, False),
        ("model.tie_embeddings=true", lambda c: c.model.tie_embeddings, True),
        ("model.ema_truncation=null", lambda c: c.model.ema_truncation, None),
        ("model.ema_truncation=512", lambda c: c.model.ema_truncation, 512),
        ("wandb.entity=null", lambda c: c.wandb.entity, None),
        ("wandb.entity=me", lambda c: c.wandb.entity, "me"),
        ("wandb.tags=[a, b]", lambda c: c.wandb.tags, ["a", "b"]),
    ],
)
def test_override_value_parsing(override, get, expected):
    value = get(load_config(overrides=[override]))
    assert value == expected
    assert type(value) is type(expected)


def test_float_with_exponent_in_yaml_file(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  min_lr: 1e-4\n")
    cfg = load_config(path)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (1e-3, 1e-4)


def test_apply_override_on_raw_dict():
    raw: dict = {}
    apply_override(raw, "model.width=8")
    apply_override(raw, "train.seq_length=16")
    assert raw == {"model": {"width": 8}, "train": {"seq_length": 16}}
    with pytest.raises(ConfigError):
        apply_override(raw, "model.width")  # no '='
    with pytest.raises(ConfigError):
        apply_override(raw, "=3")
    with pytest.raises(ConfigError, match=r"model\.width"):
        apply_override(raw, "model.width.x=1")  # a value is not a section


def test_override_list_index_out_of_range(yaml_file):
    msg = error_of(yaml_file, ["data.sources.5.weight=2"])
    assert "data.sources.5" in msg


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override,key,suggestion",
    [
        ("model.widht=3", "model.widht", "model.width"),
        ("optimizer.learning_rat=0.1", "optimizer.learning_rat", None),
        ("modle.width=3", "modle", "model"),
        ("train.seq_lenght=64", "train.seq_lenght", "train.seq_length"),
    ],
)
def test_unknown_key_names_full_dotted_key(override, key, suggestion):
    msg = error_of(overrides=[override])
    assert key in msg
    if suggestion:
        assert f"did you mean {suggestion}" in msg


def test_unknown_key_inside_list_item(yaml_file):
    msg = error_of(yaml_file, ["data.sources.1.wieght=2"])
    assert "data.sources.1.wieght" in msg
    assert "data.sources.1.weight" in msg


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  zdmi: 16\n")
    msg = error_of(path)
    assert "model.zdmi" in msg and "model.zdim" in msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.layers=abc", "model.layers"),
        ("train.seq_length=1.5", "train.seq_length"),
        ("model.layers=true", "model.layers"),  # a bool is not an int
        ("model.prenorm=1", "model.prenorm"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("model.ema_truncation=long", "model.ema_truncation"),
        ("wandb.tags=solo", "wandb.tags"),
        ("model=3", "model"),
        ("run.name=123", "run.name"),  # an int is not a str
    ],
)
def test_bad_type_names_key(override, key):
    msg = error_of(overrides=[override])
    assert msg.startswith(key) or f" {key}" in msg, msg


@pytest.mark.parametrize(
    "overrides,keys",
    [
        (["model.window=512"], ["model.window", "train.seq_length"]),
        (["model.window=65", "train.seq_length=64"], ["model.window", "train.seq_length"]),
        (
            ["train.global_batch_size=12", "train.micro_batch_size=8"],
            ["train.global_batch_size", "train.micro_batch_size"],
        ),
        (["model.zdim=31"], ["model.zdim", "rotary"]),
        (["model.layers=0"], ["model.layers"]),
        (["model.dropout=1.0"], ["model.dropout"]),
        (["model.routing=sometimes"], ["model.routing"]),
        (["model.position=alibi"], ["model.position"]),
        (["model.ema_truncation=0"], ["model.ema_truncation"]),
        (["optimizer.min_lr=0.1", "optimizer.lr=0.01"], ["optimizer.min_lr"]),
        (["data.sources=[]"], ["data.sources"]),
        (["model.arch=transformer", "model.transformer_heads=3"], ["model.transformer_heads"]),
    ],
)
def test_impossible_combinations(overrides, keys):
    msg = error_of(overrides=overrides)
    for key in keys:
        assert key in msg, msg


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.window=256"],  # equal to the sequence length is fine
        ["model.zdim=31", "model.position=simple"],  # odd zdim only matters for rotary
        ["train.global_batch_size=24", "train.micro_batch_size=8"],
        ["model.arch=transformer", "model.window=1024"],  # the baseline has no window
    ],
)
def test_possible_edge_combinations(overrides):
    load_config(overrides=overrides)


def test_validate_rejects_mutated_config():
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, window=cfg.train.seq_length + 1)
    with pytest.raises(ConfigError, match=r"model\.window"):
        validate(cfg)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = error_of(path)
    assert "nope.yaml" in msg


@pytest.mark.parametrize("text", ["model: [unclosed\n", "model:\n  width: 3\n bad: x\n"])
def test_invalid_yaml(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    msg = error_of(path)
    assert "broken.yaml" in msg and "YAML" in msg


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "list.yaml" in error_of(path)


def test_section_must_be_mapping(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: 3\n")
    assert "model" in error_of(path)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
