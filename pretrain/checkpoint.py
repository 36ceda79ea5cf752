"""Atomic, per-rank checkpoints with a ``latest`` pointer.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/
        rank_00000.pt     this rank's state: model, optimizer, scheduler, data loader, RNG, ...
        meta.json         written last: step, world size, sha256 of every rank file
    latest                name of the newest complete checkpoint (moved last)

A checkpoint is written into ``step_X.tmp``, every file fsynced, then renamed; the ``latest``
pointer moves only after that, so a kill at any moment leaves the previous checkpoint usable.
Files are plain ``torch.save`` dicts of tensors and Python primitives, loaded with
``weights_only=True``. The per-rank layout is what sharded saving extends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Writes the single process's ``state`` for ``step`` and publishes the checkpoint.

    With several ranks, each writes its ``rank_*.pt`` into the same ``.tmp`` folder and
    rank 0 publishes (meta, rename, pointer) after a barrier: the sharded format's job.
    """
    rank, world_size = 0, 1
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / (step_name(step) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    path = tmp / rank_file(rank)
    torch.save(state, path)
    _fsync(path)
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "sha256": {rank_file(rank): _sha256(path)},
    }
    _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
    _fsync(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    _write_atomic(root / LATEST, final.name + "\n")
    if keep_last > 0:
        _prune(root, keep_last)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with ``meta.json``), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    dirs = [
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
        and (p / "meta.json").is_file()
    ]  # fmt: skip
    return sorted(dirs, key=lambda p: p.name)


def load_latest(run_dir: Path, rank: int = 0) -> tuple[dict[str, Any], Path] | None:
    """The state of the newest usable checkpoint, or None if the run has none.

    Starts from the ``latest`` pointer; a checkpoint that fails its checksum or does not
    load is reported on stderr and the previous complete one is tried.
    """
    candidates = complete_checkpoints(run_dir)
    pointer = checkpoint_dir(run_dir) / LATEST
    if pointer.is_file():
        named = checkpoint_dir(run_dir) / pointer.read_text().strip()
        candidates = [p for p in candidates if p.name <= named.name]
    errors = []
    for ckpt in reversed(candidates):
        try:
            return load_checkpoint(ckpt, rank), ckpt
        except CheckpointError as e:
            errors.append(str(e))
            print(f"seqboat: warning: {e}; trying an earlier checkpoint", file=sys.stderr)
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None


def load_checkpoint(ckpt: Path, rank: int = 0) -> dict[str, Any]:
    meta_path = ckpt / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    name = rank_file(rank)
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if _sha256(path) != meta["sha256"].get(name):
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot be loaded ({e})") from None


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and ".tmp" not in p.name
    )
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
