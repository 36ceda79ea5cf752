"""Typed run configuration: dataclasses, YAML loading, dotted overrides, validation.

The dataclass defaults *are* the embedded default run (``configs/tiny.yaml`` mirrors them,
and a test keeps the two equal), so ``seqboat train`` with no arguments needs no file.
Every problem is reported up front as one ``ConfigError`` naming the key.

Over 400 lines on purpose: every key's type, default and validation rule sit in this one
file, so that a reader checking a key finds all three together.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.config import DataConfig, SourceConfig, TokenizerConfig

# The choices the model implements (pretrain/model/gau.py, norm.py); declared here, with the
# config, so that the model imports the config and never the other way round.
ATTENTION_FNS = ("softmax", "relu2")
POSITION_KINDS = ("rotary", "simple", "local", "none")
NORM_KINDS = ("layernorm", "rmsnorm", "scalenorm")


class ConfigError(ValueError):
    """A bad configuration; the message names the key and what is wrong with it."""


@dataclass
class ModelConfig:
    arch: str = "seqboat"  # "seqboat" or "transformer" (the baseline)
    layers: int = 4
    width: int = 128  # D
    zdim: int = 32  # Z, shared query/key width
    hdim: int = 256  # H, value/gate width
    ndim: int = 16  # N, EMA state per channel
    window: int = 64  # w, activated tokens each activated token attends back to
    # Queries per block of the local attention, at most w (0: w / 2). A block reads its own
    # keys and the w before it: smaller blocks compute fewer masked scores and pad less, and
    # their backward holds (w + b) / b gradients of each value (pretrain/model/gau.py).
    attention_block: int = 0
    routing: str = "sparse"  # "sparse" (router), "always" (every token), "never" (EMA only)
    attention_fn: str = "softmax"
    position: str = "rotary"  # rotary | simple (original distance) | local (activated) | none
    max_positions: int = 2048  # size of the "simple" relative-bias table
    rope_base: float = 10000.0
    norm: str = "layernorm"
    prenorm: bool = True
    final_norm_affine: bool = True
    ema_truncation: int | None = None
    ema_chunk: int = 64  # the EMA's chunk length in training (0: the whole sequence)
    init_temp_scale: float = 1.0
    act_bias: float = 0.0  # added to the skip logit: > 0 favours skipping
    ffn_hidden: int = 0  # 0 = no FFN (every released SeqBoat config)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    embedding_dropout: float = 0.0
    tie_embeddings: bool = True
    scale_embedding: bool = True
    vocab_multiple: int = 64  # the embedding is padded to a multiple of this
    transformer_heads: int = 4  # baseline only
    transformer_ffn: int = 512  # baseline only


@dataclass
class TrainConfig:
    seq_length: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 16
    max_steps: int = 300
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp64
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    log_interval: int = 10
    eval_interval: int = 100
    eval_samples: int = 32
    max_nonfinite_in_a_row: int = 5
    # Seconds a collective may wait for the other ranks before the run fails naming it
    # (megatron-core's groups round up to whole minutes). A hung rank must not hold the job
    # until the Slurm limit.
    timeout_s: float = 600.0
    # Every this many steps, log a heat map of the tokens each layer activated (the first
    # sequence of the step's batch) to W&B as an image; 0: never.
    heatmap_interval: int = 0
    # Peak TFLOP/s of one device (e.g. 989 for an H100's dense bf16) for MFU; 0: no MFU.
    peak_tflops: float = 0.0
    # Skip a step whose loss or gradient norm is more than this many standard deviations
    # above the mean of the last spike_window applied steps; 0: off.
    spike_guard: float = 0.0
    spike_window: int = 100
    # Name the slowest rank (stderr) when its step time is above this times the median.
    straggler_threshold: float = 1.2
    # torch.compile the training forward (dynamic shapes: the routing changes the GAU's
    # lengths every step). One process or data parallelism only.
    compile: bool = False
    # Activation recompute: none | gau (the attention part of each SeqBoat layer is run again
    # in backward) | layer (each layer keeps only its input). pretrain/model/recompute.py.
    recompute: str = "none"
    # [start, end]: a torch.profiler trace of those steps (1-based, inclusive) on these ranks,
    # into <run_dir>/profile/; empty: none.
    profile_steps: list[int] = field(default_factory=list)
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | radam
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup_steps: int = 30
    decay: str = "cosine"  # cosine | linear | constant | wsd (warmup, stable, decay)
    # wsd: the decay takes the last decay_fraction of train.max_steps, shaped linear, cosine
    # or 1-sqrt; until then the lr stays at optimizer.lr, so a run can be extended (raise
    # train.max_steps) from any checkpoint before its decay began.
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    clip_grad: float = 1.0
    # DeepSpeed ZeRO stage over the data-parallel group: 0 = our own data parallelism,
    # 1 = optimizer state sharded, 2 = + gradients, 3 = + parameters.
    zero_stage: int = 0


@dataclass
class CheckpointConfig:
    interval: int = 100
    keep_last: int = 2
    # ``checkpoint.async`` in YAML (a Python keyword): the step that saves copies the state to
    # host memory and trains on while a background thread writes and publishes the files.
    async_save: bool = field(default=False, metadata={"key": "async"})


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled; the WANDB_MODE variable wins
    project: str = "seqboat"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ParallelConfig:
    """How a run is split over processes; data parallelism takes the rest of the world."""

    tensor: int = 1
    sequence_parallel: bool = False  # Megatron sequence parallelism (needs tensor > 1)
    context: int = 1  # each sequence split over this many ranks (EMA states + attention halo)
    # Balance local-attention work over ranks: "off", "context" (the context-parallel group)
    # or "data" (data x context ranks).
    dispatch: str = "off"
    pipeline: int = 1  # pipeline stages (megatron-core schedules)
    # Model chunks per pipeline rank: > 1 runs megatron-core's interleaved 1F1B schedule.
    virtual_stages: int = 1
    # Layers per stage (one entry per stage x virtual stage, in layer order); empty = even.
    stage_layers: list[int] = field(default_factory=list)
    # Average gradients over data x context ranks in buckets during the step's last backward
    # (without a pipeline or ZeRO); false: one all-reduce after it.
    overlap_grad_reduce: bool = True
    grad_bucket_mb: float = 25.0


@dataclass
class EvalConfig:
    """lm-evaluation-harness tasks run every ``train.eval_interval`` steps (and at the start
    and end) on the logging rank, logged beside the validation loss as
    ``val/tasks/<task>/<metric>``. Needs the [hf] extra."""

    tasks: list[str] = field(default_factory=list)  # harness task names; empty: none
    include_path: str | None = None  # a folder of your own task YAML files
    limit: int = 0  # items per task (0: all)
    num_fewshot: int | None = None
    batch_size: int = 8


@dataclass
class RunConfig:
    name: str = "tiny"
    dir: str | None = None  # default: runs/<name>


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir if self.run.dir else Path("runs") / self.run.name)

    def to_dict(self) -> dict[str, Any]:
        return _keyed(self)


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; accept YAML 1.2 floats like every
    other config system does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``key.sub=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    # Overrides apply on top of defaults + file, so that e.g. data.sources.0.weight=2 finds
    # the default list.
    raw = _merge(Config().to_dict(), raw)
    for item in overrides or []:
        apply_override(raw, item)
    cfg = build(Config, raw, "")
    validate(cfg)
    return cfg


def _merge(base: Any, top: Any) -> Any:
    """``top`` over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    if isinstance(base, dict) and isinstance(top, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in top.items()}}
    return top


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A validated Config from a plain dict (e.g. the one saved in a run directory)."""
    cfg = build(Config, raw, "")
    validate(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Sets ``a.b.c=value`` in ``raw``; the value is YAML (``1e-3``, ``true``, ``[a]``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
    try:
        parsed = parse_yaml(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(node, list):
        node[_list_index(node, parts[-1], parts)] = parsed
    else:
        node[parts[-1]] = parsed


def _list_index(node: list[Any], part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{'.'.join(parts)}: list index out of range (list has {len(node)})")
    return int(part)


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass ``cls`` from ``raw``, type-checking every field; unknown keys fail."""
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {_key(f): f.name for f in dataclasses.fields(cls)}  # config key -> field name
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
    kwargs = {
        name: _coerce(hints[name], raw[key], f"{prefix}{key}")
        for key, name in names.items()
        if key in raw
    }
    return cls(**kwargs)


def _key(f: dataclasses.Field) -> str:
    """A field's key in the config files: its name, unless that is a Python keyword."""
    return f.metadata.get("key", f.name)


def _keyed(obj: Any) -> Any:
    """``dataclasses.asdict`` with the config files' keys."""
    if dataclasses.is_dataclass(obj):
        return {_key(f): _keyed(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return type(obj)(_keyed(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _keyed(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    m, t, o, d = cfg.model, cfg.train, cfg.optimizer, cfg.data
    _choice("model.arch", m.arch, ("seqboat", "transformer"))
    _choice("model.routing", m.routing, ("sparse", "always", "never"))
    _choice("model.attention_fn", m.attention_fn, ATTENTION_FNS)
    _choice("model.position", m.position, POSITION_KINDS)
    _choice("model.norm", m.norm, NORM_KINDS)
    _choice("train.precision", t.precision, ("fp32", "bf16", "fp64"))
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("train.recompute", t.recompute, ("none", "gau", "layer"))
    if t.recompute != "none" and m.arch != "seqboat":
        raise ConfigError("train.recompute is implemented for model.arch=seqboat only")
    if t.recompute != "none" and t.compile:
        # Compiled dropout draws from inductor's own RNG: the recompute could not replay it.
        raise ConfigError("train.recompute does not combine with train.compile")
    _choice("optimizer.name", o.name, ("adamw", "radam"))
    _choice("optimizer.decay", o.decay, ("cosine", "linear", "constant", "wsd"))
    _choice("optimizer.decay_shape", o.decay_shape, ("linear", "cosine", "1-sqrt"))
    model_split = cfg.parallel.tensor * cfg.parallel.context * cfg.parallel.pipeline
    if t.compile and (model_split > 1 or cfg.optimizer.zero_stage):
        raise ConfigError(
            "train.compile supports one process or data parallelism only (not parallel.tensor, "
            "context, pipeline or optimizer.zero_stage)"
        )
    if t.profile_steps and (
        len(t.profile_steps) != 2 or not 1 <= t.profile_steps[0] <= t.profile_steps[1]
    ):
        raise ConfigError(
            "train.profile_steps must be [start, end] with 1 <= start <= end, got "
            f"{t.profile_steps}"
        )
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"optimizer.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    _choice("wandb.mode", cfg.wandb.mode, ("offline", "online", "disabled"))
    _choice("data.tokenizer.kind", d.tokenizer.kind, ("sentencepiece", "byte"))
    _choice("data.tokenizer.model_type", d.tokenizer.model_type, ("bpe", "unigram"))
    for key, value in [
        ("model.layers", m.layers), ("model.width", m.width), ("model.zdim", m.zdim),
        ("model.hdim", m.hdim), ("model.ndim", m.ndim), ("model.window", m.window),
        ("model.max_positions", m.max_positions), ("model.vocab_multiple", m.vocab_multiple),
        ("model.transformer_heads", m.transformer_heads),
        ("train.seq_length", t.seq_length), ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size), ("train.max_steps", t.max_steps),
        ("train.log_interval", t.log_interval), ("train.eval_interval", t.eval_interval),
        ("train.eval_samples", t.eval_samples),
        ("train.max_nonfinite_in_a_row", t.max_nonfinite_in_a_row),
        ("train.timeout_s", t.timeout_s),
        ("checkpoint.interval", cfg.checkpoint.interval),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
        ("data.tokenizer.vocab_size", d.tokenizer.vocab_size),
    ]:  # fmt: skip
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in [
        ("model.dropout", m.dropout), ("model.attention_dropout", m.attention_dropout),
        ("model.hidden_dropout", m.hidden_dropout),
        ("model.embedding_dropout", m.embedding_dropout),
    ]:  # fmt: skip
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    for key, value in [
        ("model.ffn_hidden", m.ffn_hidden), ("model.ema_chunk", m.ema_chunk),
        ("model.attention_block", m.attention_block),
        ("train.heatmap_interval", t.heatmap_interval),
        ("train.threads", t.threads), ("optimizer.warmup_steps", o.warmup_steps),
    ]:  # fmt: skip
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if m.arch == "seqboat" and m.window > t.seq_length:
        raise ConfigError(
            f"model.window ({m.window}) must not exceed train.seq_length ({t.seq_length})"
        )
    if m.position == "rotary" and m.zdim % 2:
        raise ConfigError(f"model.zdim ({m.zdim}) must be even for rotary positions")
    if m.arch == "transformer" and (
        m.width % m.transformer_heads or (m.width // m.transformer_heads) % 2
    ):
        raise ConfigError(
            f"model.width ({m.width}) must split into model.transformer_heads "
            f"({m.transformer_heads}) heads of even size"
        )
    if m.ema_truncation is not None and m.ema_truncation <= 0:
        raise ConfigError(f"model.ema_truncation must be positive or null, got {m.ema_truncation}")
    micro_batches_per_step(cfg, data_parallel=1)
    if not 0.0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optimizer.min_lr ({o.min_lr}) must be in [0, optimizer.lr={o.lr}]")
    if o.clip_grad < 0:
        raise ConfigError(f"optimizer.clip_grad must be >= 0 (0 = off), got {o.clip_grad}")
    _validate_parallel(cfg)
    _validate_eval(cfg.eval)
    if not 0.0 <= d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction must be in [0, 0.5), got {d.val_fraction}")
    if not d.sources:
        raise ConfigError("data.sources must name at least one source")
    for i, src in enumerate(d.sources):
        _validate_source(f"data.sources.{i}", src)


def _validate_parallel(cfg: Config) -> None:
    """What the config alone can tell; sizes against the world are checked at launch."""
    p, m = cfg.parallel, cfg.model
    _choice("parallel.dispatch", p.dispatch, ("off", "context", "data"))
    if p.dispatch == "context" and p.context == 1:
        raise ConfigError("parallel.dispatch=context needs parallel.context > 1")
    if min(p.tensor, p.context, p.pipeline, p.virtual_stages) <= 0:
        raise ConfigError(
            "parallel.tensor, context, pipeline and virtual_stages must be positive, got "
            f"{p.tensor}, {p.context}, {p.pipeline}, {p.virtual_stages}"
        )
    _validate_pipeline(cfg)
    _validate_zero(cfg)
    if p.context > 1:
        if m.arch != "seqboat":
            raise ConfigError("parallel.context > 1 is implemented for model.arch=seqboat only")
        if cfg.train.seq_length % p.context:
            raise ConfigError(
                f"train.seq_length ({cfg.train.seq_length}) must be divisible by "
                f"parallel.context ({p.context})"
            )
    if p.tensor == 1:
        if p.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
        return
    if m.arch != "seqboat":
        raise ConfigError("parallel.tensor > 1 is implemented for model.arch=seqboat only")
    for key, value in [
        ("model.width", m.width), ("model.hdim", m.hdim), ("model.ffn_hidden", m.ffn_hidden),
        ("model.vocab_multiple", m.vocab_multiple),
    ]:  # fmt: skip
        if value % p.tensor:
            raise ConfigError(f"{key} ({value}) must be divisible by parallel.tensor ({p.tensor})")
    if p.sequence_parallel and (cfg.train.seq_length // p.context) % p.tensor:
        raise ConfigError(
            f"train.seq_length / parallel.context ({cfg.train.seq_length // p.context}) must be "
            f"divisible by parallel.tensor ({p.tensor}) with sequence parallelism"
        )


def _validate_pipeline(cfg: Config) -> None:
    p, m = cfg.parallel, cfg.model
    chunks = p.pipeline * p.virtual_stages
    if p.virtual_stages > 1 and p.pipeline == 1:
        raise ConfigError("parallel.virtual_stages > 1 needs parallel.pipeline > 1")
    if p.stage_layers:
        if len(p.stage_layers) != chunks or min(p.stage_layers) < 1:
            raise ConfigError(
                f"parallel.stage_layers needs {chunks} positive entries (pipeline x "
                f"virtual_stages), got {p.stage_layers}"
            )
        if sum(p.stage_layers) != m.layers:
            raise ConfigError(
                f"parallel.stage_layers {p.stage_layers} sums to {sum(p.stage_layers)}, "
                f"not model.layers ({m.layers})"
            )
    elif m.layers % chunks:
        raise ConfigError(
            f"model.layers ({m.layers}) must be divisible by parallel.pipeline x "
            f"virtual_stages ({chunks}), or set parallel.stage_layers"
        )
    if p.pipeline > 1 and m.arch != "seqboat":
        raise ConfigError("parallel.pipeline > 1 is implemented for model.arch=seqboat only")


def _validate_eval(e: EvalConfig) -> None:
    if e.limit < 0 or e.batch_size <= 0 or (e.num_fewshot is not None and e.num_fewshot < 0):
        raise ConfigError(
            f"eval.limit ({e.limit}) and eval.num_fewshot ({e.num_fewshot}) must be >= 0 and "
            f"eval.batch_size ({e.batch_size}) positive"
        )
    if any(not t.strip() for t in e.tasks):
        raise ConfigError(f"eval.tasks has an empty task name: {e.tasks}")
    if e.include_path is not None and not Path(e.include_path).is_dir():
        raise ConfigError(f"eval.include_path: no such folder: {e.include_path}")
    if e.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.tasks needs lm-eval: pip install -c constraints.txt -e '.[hf]'")


def _validate_zero(cfg: Config) -> None:
    stage = cfg.optimizer.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"optimizer.zero_stage must be 0, 1, 2 or 3, got {stage}")
    if stage >= 2 and cfg.parallel.pipeline > 1:
        raise ConfigError(
            f"optimizer.zero_stage={stage} cannot run with parallel.pipeline > 1 (DeepSpeed "
            "allows ZeRO-1 only with pipeline parallelism)"
        )


def _validate_source(key: str, src: SourceConfig) -> None:
    given = [n for n in ("path", "hf_name", "builtin", "tokenized") if getattr(src, n)]
    if len(given) != 1:
        raise ConfigError(
            f"{key}: set exactly one of path, hf_name, builtin, tokenized (got {given or 'none'})"
        )
    if src.errors not in ("strict", "replace"):
        raise ConfigError(f"{key}.errors must be 'strict' or 'replace', got {src.errors!r}")
    if src.builtin is not None and src.builtin != "pydoc":
        raise ConfigError(f"{key}.builtin: unknown builtin corpus {src.builtin!r} (known: pydoc)")
    if src.weight <= 0:
        raise ConfigError(f"{key}.weight must be positive, got {src.weight}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")


__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrainConfig",
    "WandbConfig",
    "config_from_dict",
    "load_config",
    "save_config",
]


def micro_batches_per_step(cfg: Config, data_parallel: int) -> int:
    """Micro-batches each data-parallel rank runs per step: ``global_batch_size /
    (micro_batch_size x data_parallel)``; a ``ConfigError`` if that does not divide, or if
    the interleaved pipeline schedule cannot take that many (a multiple of the pipeline
    size). The one place these rules live: config validation, the Trainer and the Slurm
    submission (which knows the data-parallel size before the job runs) all ask here."""
    t, p = cfg.train, cfg.parallel
    if t.global_batch_size % (t.micro_batch_size * data_parallel):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {data_parallel})"
        )
    micro_batches = t.global_batch_size // (t.micro_batch_size * data_parallel)
    if p.pipeline > 1 and p.virtual_stages > 1 and micro_batches % p.pipeline:
        raise ConfigError(
            f"the interleaved pipeline needs micro-batches per step ({micro_batches} = "
            "train.global_batch_size / (micro_batch_size x data-parallel size)) to be a "
            f"multiple of parallel.pipeline ({p.pipeline})"
        )
    return micro_batches
