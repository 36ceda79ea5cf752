"""Atomic, per-rank checkpoints with a ``latest`` pointer.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/
        rank_00000.pt     each rank's state: model shard, optimizer, scheduler, data loader, RNG
        rank_00001.pt     ...
        meta.json         written last, by rank 0: step, world size, sha256 of every rank file
    latest                name of the newest complete checkpoint (moved last)

Every rank writes its file into ``step_X.tmp`` and fsyncs it; once all have (a barrier),
rank 0 writes the meta, renames the folder and only then moves ``latest``, so a kill at any
moment leaves the previous checkpoint usable.
Files are plain ``torch.save`` dicts of tensors and Python primitives, loaded with
``weights_only=True``. The per-rank layout is what sharded saving extends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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


def save_checkpoint(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int = 0,
    layout: Layout | None = None,
) -> Path:
    """Every rank writes its ``state`` for ``step``; rank 0 publishes once all are written.

    Collective when a process group is initialized: every rank must call it.
    """
    rank, world_size = _rank_and_world()
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    tmp = root / (step_name(step) + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    path = tmp / rank_file(rank)
    torch.save(state, path)
    _fsync(path)
    checksums = dict(_gather((rank_file(rank), _sha256(path))))
    if rank == 0:
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "layout": (layout or Layout(dp_size=world_size)).sizes(),
            "sha256": checksums,
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
    _barrier()
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


@dataclass(frozen=True)
class Layout:
    """How a run is split: this rank's coordinates and the sizes (megatron-core's rank order
    tp-cp-dp, so global rank = tp + tp_size * (cp + cp_size * dp))."""

    tp_rank: int = 0
    tp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    def sizes(self) -> dict[str, int]:
        return {"tp_size": self.tp_size, "cp_size": self.cp_size, "dp_size": self.dp_size}


def load_latest(run_dir: Path, layout: Layout | None = None) -> tuple[dict[str, Any], Path] | None:
    """This rank's state in the newest checkpoint every rank can use, or None if none exists.

    Starts from the ``latest`` pointer; a checkpoint whose file fails its checksum or does
    not load on any rank is reported and the previous complete one is tried (all ranks
    agree on the choice). Collective when a process group is initialized. A checkpoint of
    another data-parallel size loads too (the data-parallel replicas hold the same model
    and optimizer state, and the data order is global): ``state["elastic"]`` is then True.
    """
    rank, _ = _rank_and_world()
    layout = layout or Layout()
    candidates = complete_checkpoints(run_dir)
    pointer = checkpoint_dir(run_dir) / LATEST
    if pointer.is_file():
        named = pointer.read_text().strip()
        candidates = [p for p in candidates if p.name <= named]
    errors = []
    for ckpt in reversed(candidates):
        state, error = None, None
        try:
            state = load_checkpoint(ckpt, layout)
        except CheckpointError as e:
            error = str(e)
        failures = [e for e in _gather(error) if e is not None]
        if not failures:
            return state, ckpt
        errors.extend(failures)
        if rank == 0:
            for e in failures:
                print(f"seqboat: warning: {e}; trying an earlier checkpoint", file=sys.stderr)
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None


def load_checkpoint(ckpt: Path, layout: Layout | None = None) -> dict[str, Any]:
    """The state this rank resumes from: its own file, or, when the data-parallel size
    changed, the file of the same tensor/context coordinates on a surviving replica."""
    layout = layout or Layout()
    meta = read_meta(ckpt)
    saved = meta.get("layout") or {"tp_size": 1, "cp_size": 1, "dp_size": meta["world_size"]}
    if (saved["tp_size"], saved["cp_size"]) != (layout.tp_size, layout.cp_size):
        raise CheckpointError(
            f"{ckpt} was written with tensor x context sizes {saved['tp_size']} x "
            f"{saved['cp_size']} and this run has {layout.tp_size} x {layout.cp_size}; "
            "resharding the model across those is not implemented yet"
        )
    dp = min(layout.dp_rank, saved["dp_size"] - 1)
    source = layout.tp_rank + layout.tp_size * (layout.cp_rank + layout.cp_size * dp)
    state = load_rank_file(ckpt, source, meta)
    state["elastic"] = saved["dp_size"] != layout.dp_size
    return state


def read_meta(ckpt: Path) -> dict[str, Any]:
    meta_path = ckpt / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def load_rank_file(ckpt: Path, rank: int, meta: dict[str, Any]) -> dict[str, Any]:
    """One rank's file, its checksum verified; loaded with ``weights_only=True``."""
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


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_and_world()[1] > 1:
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (just ``[obj]`` on one process)."""
    world_size = _rank_and_world()[1]
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


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
