"""Run monitoring: Weights & Biases (offline unless told otherwise) and ``metrics.jsonl``.

Every metric is logged with an explicit ``step=``: an offline W&B run that is resumed
restarts W&B's own counter, so implicit steps would misplace the curve. The same records go
to ``<run_dir>/metrics.jsonl``, which is truncated back to the checkpoint's step on resume
so that the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from pretrain.config import Config

METRICS_FILE = "metrics.jsonl"


def new_run_id() -> str:
    """A fresh W&B run id (8 lowercase hex characters, W&B's own id alphabet is wider)."""
    return secrets.token_hex(4)


def wandb_mode(cfg: Config) -> str:
    """The W&B mode: the WANDB_MODE variable wins over the config (so online is one
    variable away), and W&B's ``dryrun`` spelling means offline."""
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    return "offline" if mode == "dryrun" else mode


class Monitor:
    """Logs from one rank (``enabled``); the others keep the same calls as no-ops."""

    def __init__(
        self, cfg: Config, run_dir: Path, run_id: str, resume_step: int, enabled: bool = True
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        truncate_metrics(self.path, resume_step)
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.run.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                tags=cfg.wandb.tags,
                config={**cfg.to_dict(), "launch": launch_info()},
                # A loaded node can take long to start W&B's service process: wait, rather
                # than fail a training run over its monitoring.
                settings=wandb.Settings(console="off", silent=True, init_timeout=300),
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def launch_info() -> dict[str, str | None]:
    """Where this process was started: the Slurm job, array task and restart count, if any
    (SLURM_RESTART_COUNT is unset on a job's first run)."""
    names = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {name.lower(): os.environ.get(name) for name in names}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drops records after ``last_step`` (logged after the checkpoint a resume starts from)."""
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= last_step]
    if len(kept) != len(records):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
