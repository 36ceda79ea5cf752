"""A run's directory: the resolved config a run was started with, and the check that a run
resumed there is the same run.

Config sections that define the model and the data order must not change when a run
resumes; everything else (steps, intervals, logging) may.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from parallel.dims import ParallelDims
from pretrain.build import wsd_decay_start
from pretrain.checkpoint import complete_checkpoints, read_meta
from pretrain.config import Config, ConfigError, config_from_dict, parse_yaml, save_config

CONFIG_FILE = "config.yaml"
# Where PyTorch's NCCL flight recorder dumps (a file-name prefix; see pretrain/slurm.py).
NCCL_TRACE_ENV = "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"

FROZEN_ON_RESUME = (
    "model", "data", "train.seq_length", "train.global_batch_size", "train.seed",
    "optimizer.zero_stage",  # where the optimizer state is kept (DeepSpeed's files or ours)
    # The learning-rate schedule of the steps already taken (train.max_steps may change:
    # see check_schedule_change).
    "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps", "optimizer.decay",
    "optimizer.decay_fraction", "optimizer.decay_shape",
)  # fmt: skip


def prepare_run_dir(cfg: Config, dims: ParallelDims) -> None:
    """Refuses a run directory that holds another run, or a schedule change its newest
    checkpoint cannot take (on every rank: the same files, the same verdict, so no rank waits
    for one that raised); then rank 0 writes the config."""
    path = cfg.run_dir / CONFIG_FILE
    saved = _with_defaults(parse_yaml(path.read_text())) if path.is_file() else None
    if saved is not None:
        check_resumable(saved, cfg.to_dict(), cfg.run_dir)
        checkpoints = complete_checkpoints(cfg.run_dir)
        if checkpoints:  # checked before the new config is written: a refusal loses nothing
            check_schedule_change(saved, cfg, int(read_meta(checkpoints[-1])["step"]))
    _barrier(dims)
    if dims.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path)
    # The NCCL flight recorder's dumps (the Slurm script points them into the run directory)
    # need their folder: torch does not create it. Every node: the run dir may be node-local.
    if dims.world.local_rank == 0 and (trace := os.environ.get(NCCL_TRACE_ENV)):
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
    _barrier(dims)


def check_schedule_change(saved: dict[str, Any], cfg: Config, step: int) -> None:
    """A WSD run may be extended or shortened (``train.max_steps`` changed) from a checkpoint
    taken before its decay began under both plans: the steps taken and the steps to come
    until the new decay are then at ``optimizer.lr`` either way."""
    before = int(_lookup(saved, "train.max_steps"))
    after = cfg.train.max_steps
    if before == after or cfg.optimizer.decay != "wsd":
        return
    decay = min(wsd_decay_start(cfg.optimizer, before), wsd_decay_start(cfg.optimizer, after))
    if step > decay:
        raise ConfigError(
            f"{cfg.run_dir}: train.max_steps {before} -> {after} changes the WSD schedule of "
            f"step {step}, which is past the decay start {decay}; resume with "
            f"train.max_steps={before}, or from a checkpoint at step {decay} or earlier"
        )


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the defaults of keys added since it was written (a run started
    before a key existed had its default)."""
    try:
        return config_from_dict(saved).to_dict()
    except ConfigError:  # a key since removed: compared as it is
        return saved


def check_resumable(saved: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    changed = []
    for key in FROZEN_ON_RESUME:
        a, b = _lookup(saved, key), _lookup(current, key)
        if a != b:
            changed.extend(_diff(a, b, key))
    if changed:
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({'; '.join(changed[:5])}); "
            "resume it with its own config, or set run.name / run.dir for a new run"
        )


def _lookup(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _diff(a: Any, b: Any, key: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{key}.{k}")]
    return [] if a == b else [f"{key}: {a!r} -> {b!r}"]


def _barrier(dims: ParallelDims) -> None:
    if dims.distributed:
        dist.barrier()
