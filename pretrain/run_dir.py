"""A run's directory: the resolved config a run was started with, and the check that a run
resumed there is the same run.

Config sections that define the model and the data order must not change when a run
resumes; everything else (steps, intervals, logging) may.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from parallel.dims import ParallelDims
from pretrain.config import Config, ConfigError, parse_yaml, save_config

CONFIG_FILE = "config.yaml"

FROZEN_ON_RESUME = (
    "model", "data", "train.seq_length", "train.global_batch_size", "train.seed",
    "optimizer.zero_stage",  # where the optimizer state is kept (DeepSpeed's files or ours)
)  # fmt: skip


def prepare_run_dir(cfg: Config, dims: ParallelDims) -> None:
    """Refuses a run directory that holds another run (on every rank: the same file, the
    same verdict, so no rank waits for one that raised); then rank 0 writes the config."""
    saved = cfg.run_dir / CONFIG_FILE
    if saved.is_file():
        check_resumable(parse_yaml(saved.read_text()), cfg.to_dict(), cfg.run_dir)
    _barrier(dims)
    if dims.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    _barrier(dims)


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
