"""Atomic, sharded checkpoints with a ``latest`` pointer.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/
        model/            megatron-core dist_checkpointing (PyTorch distributed checkpoint):
            __0_0.distcp    model and optimizer tensors, each rank writing its own shards
            __1_0.distcp    (whole tensors' layout: loads into any tensor/context/data split)
            .metadata, common.pt, metadata.json
        rank_00000.pt     each rank's other state: optimizer record, scheduler, data loader,
        rank_00001.pt     RNG, train counters and W&B run id (``torch.save``)
        meta.json         written last, by rank 0: step, layout, sha256 of EVERY file above
    latest                name of the newest complete checkpoint (moved last)

Every rank writes into ``step_X.tmp`` (in parallel, fsynced); once all have (a barrier),
each hashes the files it wrote, rank 0 writes ``meta.json`` (the completion marker), renames
the folder and only then moves ``latest``: a kill at any moment leaves the previous
checkpoint usable, and a checkpoint without ``meta.json`` is never read. On load, every
file is checked against its checksum first (the ranks share the work) and a bad one is
reported by name; loading then falls back to the previous complete checkpoint.

Test hook: ``SEQBOAT_CHECKPOINT_PAUSE=<step>:<path>`` makes the save of that step stop
after this rank's files are written, create ``<path>.rank<N>`` (holding its pid), and wait
until ``<path>`` exists -- a deterministic moment to kill a rank in the middle of a save
(the pid is the training process's, also when its writer process pauses).
``SEQBOAT_CHECKPOINT_WRITE_PAUSE`` does the same when ``write_checkpoint`` starts, before
the rank writes anything but the files of the staging (ZeRO's): for the background writer of
``checkpoint.async``, training goes on meanwhile.

A save is staged at the step (``stage_checkpoint``: what must be taken then; no collective
and no process group) and written by ``write_checkpoint`` (the rest, collective over the
default group), at once or by the writer process of ``checkpoint.async``
(``pretrain/background_save.py``: there the default group is the writers' own world).
megatron-core's check of the sharding runs on the first save and when the sharding changed
(``ShardingCheck``), not on every save.

Over 400 lines on purpose: the format's guarantees (write order, fsyncs, checksums,
publication, fallback on load) hold only together, and are reviewed together here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

FORMAT_VERSION = 2
LATEST = "latest"
META = "meta.json"
SHARDED = "model"  # the dist_checkpointing folder inside a step
PAUSE_ENV = "SEQBOAT_CHECKPOINT_PAUSE"
WRITE_PAUSE_ENV = "SEQBOAT_CHECKPOINT_WRITE_PAUSE"
# The pid the test hooks report as this rank's: the training process's, also when a
# checkpoint writer process of it writes (``pretrain/checkpoint_writer.py`` sets it).
RANK_PID: int | None = None

# Builds the sharded state dict to load into from this rank's loaded file (the optimizer's
# state shapes are in it).
Template = Callable[[dict[str, Any]], dict[str, Any]]


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
    sizes: dict[str, int] | None = None,
    sharded: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Every rank writes its ``state`` (``torch.save``) and its shards of ``sharded`` (a
    megatron-core sharded state dict, saved with ``dist_checkpointing``) for ``step``;
    rank 0 publishes once all are written. ``extra(folder)`` writes more of this rank's files
    into the step folder before that (DeepSpeed's ZeRO files); they are checksummed too.

    Collective when a process group is initialized: every rank must call it.
    """
    staged = stage_checkpoint(run_dir, step, state, keep_last, sizes, sharded, extra)
    return write_checkpoint(staged)


@dataclass
class StagedCheckpoint:
    """A checkpoint staged by ``stage_checkpoint``: its folder made, its tensors and rank file
    waiting in memory for ``write_checkpoint`` to write and publish."""

    run_dir: Path
    step: int
    keep_last: int
    layout: dict[str, int]
    rank_file: bytes  # this rank's ``torch.save``d state
    sharded: dict[str, Any] | None  # this rank's sharded tensors (megatron-core's) to write
    common: dict[str, Any] | None  # the rest of that state dict (``common.pt``, rank 0's)
    check: ShardingCheck
    timings: dict[str, float]  # seconds of each part of the staging (profiling)


class ShardingCheck:
    """megatron-core's check that a save's sharding is complete and without overlaps (each
    piece of every tensor written exactly once, by a main replica: its
    ``validate_sharding_integrity``), run only when the sharding differs from the one checked
    last: on the first save of a run and after a change of split, shapes or keys.

    The sharding is every rank's sharded-tensor metadata (keys, shapes, offsets, replica ids,
    dtypes, no data); rank 0 keeps the one it checked and decides alone, so the ranks cannot
    disagree on whether to check. Checked on every save, the all-gather and the check were
    most of the time a ``checkpoint.async`` save held training (bench/RESULTS.md)."""

    def __init__(self) -> None:
        self.checked: list[list[Any]] | None = None
        self.runs = 0  # how many times the check ran (rank 0)

    def __call__(self, sharding: list[list[Any]]) -> None:
        """Rank 0 (inside a process group): checks ``sharding`` (every rank's, in rank
        order) unless it equals the one checked last; raises CheckpointError if invalid."""
        from megatron.core.dist_checkpointing.validation import validate_sharding_integrity

        if sharding == self.checked:
            return
        self.runs += 1
        try:
            validate_sharding_integrity(sharding)
        except Exception as e:  # megatron raises CheckpointingException or asserts
            raise CheckpointError(f"invalid sharding: {e!r}") from None
        self.checked = sharding


def stage_checkpoint(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int = 0,
    sizes: dict[str, int] | None = None,
    sharded: dict[str, Any] | PreparedShards | None = None,
    extra: Callable[[Path], None] | None = None,
    check: ShardingCheck | None = None,
) -> StagedCheckpoint:
    """The part of a save that must happen at the step: rank 0 makes the ``step_X.tmp``
    folder, megatron-core's factories are applied and the common (non-tensor) part split
    off, every rank serializes its state, and ``extra``'s files are written (collective
    then: every rank waits for the folder). ``sharded`` may be prepared already
    (``PreparedShards``: a background save's, whose tensors are host copies that training
    cannot change while ``write_checkpoint`` runs; ``pretrain/host_staging.py``). Without
    ``extra`` nothing here needs a process group: all that does (``common.pt``, the sharding
    check, torch DCP's plan of the shard files, the barriers) and all that can wait is
    ``write_checkpoint``'s."""
    timings: dict[str, float] = {}
    rank, world_size = _rank_and_world()
    check = check if check is not None else ShardingCheck()
    tmp = _tmp_folder(run_dir, step)
    with timed(timings, "folder"):
        if rank == 0:
            if tmp.exists():  # left by a save that was killed
                shutil.rmtree(tmp)
            (tmp / SHARDED).mkdir(parents=True)
        if extra is not None:
            _barrier()  # every rank writes into the folder now
    if isinstance(sharded, dict):
        with timed(timings, "preprocess"):
            sharded = preprocess_sharded(sharded)
    prepared = sharded if sharded is not None else PreparedShards(None, None)
    if extra is not None:
        with timed(timings, "extra"):
            extra(tmp)
    with timed(timings, "rank_file"):
        buffer = io.BytesIO()
        torch.save(state, buffer)  # serialized now: the caller's objects may change afterwards
    layout = sizes or _data_parallel_only(world_size)
    return StagedCheckpoint(
        Path(run_dir), step, keep_last, layout, buffer.getvalue(), prepared.sharded,
        prepared.common, check, timings,
    )  # fmt: skip


def write_checkpoint(staged: StagedCheckpoint) -> Path:
    """Writes what ``stage_checkpoint`` kept in memory and publishes the checkpoint once
    every rank has (collective when a process group is initialized)."""
    rank, world_size = _rank_and_world()
    root = checkpoint_dir(staged.run_dir)
    final = root / step_name(staged.step)
    tmp = _tmp_folder(staged.run_dir, staged.step)
    _pause_for_tests(staged.step, rank, WRITE_PAUSE_ENV)
    _barrier()  # rank 0 made the folder (staging) before any rank writes into it
    if staged.sharded is not None:
        _write_sharded(staged.sharded, staged.common, staged.check, tmp / SHARDED)
    path = tmp / rank_file(rank)
    with open(path, "wb") as f:
        f.write(staged.rank_file)
    _fsync(path)
    _pause_for_tests(staged.step, rank)
    _barrier()  # every rank's files are complete
    own = _hash_own_files(tmp, rank)
    checksums = {k: v for part in _gather(own) for k, v in part.items()}
    if rank == 0:
        meta = {
            "format": FORMAT_VERSION,
            "step": staged.step,
            "world_size": world_size,
            "layout": staged.layout,
            "sharded": staged.sharded is not None,
            "sha256": dict(sorted(checksums.items())),
        }
        _write_atomic(tmp / META, json.dumps(meta, indent=1))
        _fsync(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        _write_atomic(root / LATEST, final.name + "\n")
        if staged.keep_last > 0:
            _prune(root, staged.keep_last)
    _barrier()
    return final


def _tmp_folder(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / (step_name(step) + ".tmp")


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the seconds of the ``with`` block to ``timings[name]`` (a save's parts)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


# megatron-core's ``torch_dist`` format (its ``metadata.json``), written through torch DCP.
_BACKEND, _BACKEND_VERSION = "torch_dist", 1


@dataclass
class PreparedShards:
    """A sharded state dict as ``write_checkpoint`` writes it: megatron-core's factories
    applied (``sharded``), the common (non-tensor) part split off (``common``)."""

    sharded: dict[str, Any] | None
    common: dict[str, Any] | None


def preprocess_sharded(sharded: dict[str, Any]) -> PreparedShards:
    """The first step of megatron-core's ``dist_checkpointing.save``, with its function.
    Needs no process group (the check of the sharding, which does, is
    ``_write_sharded``'s)."""
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    from parallel import cpu_compat

    cpu_compat.install()
    return PreparedShards(*save_preprocess(sharded, validate_access_integrity=False))


def _write_sharded(
    sharded: dict[str, Any],
    common: dict[str, Any] | None,
    check: ShardingCheck,
    folder: Path,
) -> None:
    """The rest of megatron-core's ``dist_checkpointing.save``, with its functions: rank 0's
    ``common.pt``, the check of the sharding (when it changed), the conversion to torch
    DCP and the shard files (megatron's ``save`` itself would check the sharding on every
    save). Collective; megatron asks the default group for the rank here, so a process
    without one gets a temporary one-rank group."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy

    with _process_group():
        if common is not None:
            get_default_save_common_strategy().save_common(common, folder)  # rank 0 only
        _check_sharding(sharded, check, folder)
        shards = _to_dcp(sharded)
    _write_shards(shards, folder)


def _check_sharding(sharded: dict[str, Any], check: ShardingCheck, folder: Path) -> None:
    """megatron-core's check of the sharding (``ShardingCheck``: when it changed) of every
    rank's ``sharded``, gathered; raises on every rank if it fails, so that none goes on
    into the writing collectives. Collective."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    sharding = _gather([t.without_data() for t in nested_values(sharded)])
    error = None
    if _rank_and_world()[0] == 0:
        try:
            check(sharding)
        except CheckpointError as e:
            error = f"{folder}: {e}"
    errors = [e for e in _gather(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0])


def _to_dcp(sharded: dict[str, Any]) -> dict[str, Any]:
    """The main replicas of ``sharded`` (replica id all zeros: the pieces this rank writes)
    as torch DCP's state dict (megatron-core's conversion)."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, True)
    return mcore_to_pyt_state_dict(flat, False)


def _write_shards(shards: dict[str, Any], folder: Path) -> None:
    """This rank's shard file and megatron-core's ``metadata.json`` (rank 0): the rest of
    its ``dist_checkpointing.save``. Collective.

    megatron's own writer forks a writer process per save and reports through a spawned
    ``Manager`` process: that fails in daemonic processes, leaves orphans when a rank is
    killed, needs ``__main__`` guards and may die by a stop signal sent to the process
    group. PyTorch's ``FileSystemWriter`` writes the same files (``__<rank>_0.distcp``,
    ``.metadata``), fsynced, and megatron's default loader reads them."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    rank, world_size = _rank_and_world()
    dcp_save(
        shards,
        storage_writer=FileSystemWriter(
            folder, single_file_per_rank=True, sync_files=True, thread_count=1
        ),
        planner=MCoreSavePlanner(flatten_state_dict=False, can_run_decentralized_global_plan=False),
        no_dist=world_size == 1,
    )
    if rank == 0:
        save_config(CheckpointingConfig(_BACKEND, _BACKEND_VERSION), str(folder))


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """dist_checkpointing needs a process group: a single process gets a one-rank gloo
    group (an in-memory store, no port) for the duration."""
    from parallel import cpu_compat

    cpu_compat.install()  # megatron's checkpointing calls torch.cuda (a no-op with CUDA)
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _pause_for_tests(step: int, rank: int, env: str = PAUSE_ENV) -> None:
    """The ``SEQBOAT_CHECKPOINT_PAUSE`` and ``..._WRITE_PAUSE`` hooks (module docstring)."""
    spec = os.environ.get(env, "")
    at, _, path = spec.partition(":")
    if not path or int(at) != step:
        return
    release = Path(path)
    Path(f"{path}.rank{rank}").write_text(str(RANK_PID or os.getpid()))
    while not release.exists():
        time.sleep(0.05)


# Files of a step written by one rank: its state file and dist_checkpointing's shard files.
_OWNED = re.compile(r"(?:^|/)(?:rank_(\d+)\.pt|__(\d+)_\d+\.distcp)$")


def _hash_own_files(ckpt: Path, rank: int) -> dict[str, str]:
    """sha256 of the files this rank wrote (rank 0: also the shared ones), by relative path."""
    out = {}
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        rel = path.relative_to(ckpt).as_posix()
        if rel == META:
            continue
        match = _OWNED.search(rel)
        owner = int(match.group(1) or match.group(2)) if match else 0
        if owner == rank:
            out[rel] = _sha256(path)
    return out


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with ``meta.json``), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    dirs = [
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
        and (p / META).is_file()
    ]  # fmt: skip
    return sorted(dirs, key=lambda p: p.name)


def remove_partial(run_dir: Path) -> list[Path]:
    """Deletes the ``step_X.tmp`` folders of saves that were killed; returns them. Only
    while no save runs (rank 0, before training)."""
    root = checkpoint_dir(run_dir)
    partial = sorted(root.glob("step_*.tmp")) if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def load_latest(
    run_dir: Path, sizes: dict[str, int] | None = None, template: Template | None = None
) -> tuple[dict[str, Any], Path] | None:
    """This rank's state in the newest checkpoint every rank can use, or None if none exists.

    Starts from the ``latest`` pointer (from the newest complete checkpoint, with a warning,
    when the one it names is gone); a checkpoint with a file that fails its checksum or
    does not load is reported and the previous complete one is tried (all ranks agree on
    the choice). Collective when a process group is initialized. With a ``template``, the
    sharded tensors are loaded too (``state["sharded"]``), resharded to this run's split.
    A checkpoint of another tensor/context/data-parallel layout loads: ``state["elastic"]``
    is then True (the per-rank state, e.g. RNG streams, is not this rank's own).
    """
    rank, _ = _rank_and_world()
    candidates = complete_checkpoints(run_dir)
    pointer = checkpoint_dir(run_dir) / LATEST
    if pointer.is_file():
        named = pointer.read_text().strip()
        if any(p.name == named for p in candidates):
            candidates = [p for p in candidates if p.name <= named]
        elif candidates and rank == 0:  # deleted by hand, or pruned (by name)
            print(
                f"seqboat: warning: {pointer} names {named}, which is not a complete "
                f"checkpoint; using the newest complete one, {candidates[-1].name}",
                file=sys.stderr,
            )
    errors: list[str] = []
    for ckpt in reversed(candidates):
        state, error = None, None
        try:
            state = load_checkpoint(ckpt, sizes, template)
        except CheckpointError as e:
            error = str(e)
        failures = list(dict.fromkeys(e for e in _gather(error) if e is not None))
        if not failures:
            return state, ckpt
        errors.extend(failures)
        if rank == 0:
            for e in failures:
                print(f"seqboat: warning: {e}; trying an earlier checkpoint", file=sys.stderr)
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None


def load_checkpoint(
    ckpt: Path, sizes: dict[str, int] | None = None, template: Template | None = None
) -> dict[str, Any]:
    """The state this rank resumes from: its own file when the layout is the one saved,
    else rank 0's (the per-rank state is then not this rank's: ``elastic``); with a
    ``template``, plus the sharded tensors under ``"sharded"``. Every file's checksum is
    verified first. Collective: the ranks agree on any failure before loading shards."""
    rank, world_size = _rank_and_world()
    sizes = sizes or _data_parallel_only(world_size)
    meta = read_meta(ckpt)
    _agree(lambda: verify_files(ckpt, meta, rank, world_size))
    same = meta["layout"] == sizes and meta["world_size"] == world_size
    source = rank if same else 0
    state = _agree(lambda: load_rank_file(ckpt, source, meta))
    state["elastic"] = not same
    state["saved_layout"] = meta["layout"]
    if template is not None:
        if not meta.get("sharded"):
            raise CheckpointError(f"{ckpt / META}: the checkpoint holds no sharded state")
        state["sharded"] = load_sharded(ckpt / SHARDED, template(state))
    return state


def load_sharded(folder: Path, sharded: dict[str, Any]) -> dict[str, Any]:
    """Loads ``sharded`` (a megatron-core sharded state dict) from ``folder``: this rank's
    pieces of the whole tensors, whatever the split they were saved with."""
    from megatron.core import dist_checkpointing

    try:
        with _process_group():
            return dist_checkpointing.load(sharded, str(folder))
    except Exception as e:  # checksums passed: a mismatch of keys or shapes
        raise CheckpointError(f"{folder}: cannot be loaded ({e})") from None


def _agree(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it raised a CheckpointError on any, raises on all (so no
    rank enters a collective load the others left)."""
    result, error = None, None
    try:
        result = fn()
    except CheckpointError as e:
        error = str(e)
    failures = list(dict.fromkeys(e for e in _gather(error) if e is not None))
    if failures:
        raise CheckpointError("; ".join(failures))
    return result


def verify_files(ckpt: Path, meta: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
    """Checks this rank's share of the checkpoint's files (every ``world_size``-th, all on
    one process) against ``meta.json``; raises naming the first bad file."""
    for name in sorted(meta["sha256"])[rank::world_size]:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if _sha256(path) != meta["sha256"][name]:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt)")


def read_meta(ckpt: Path) -> dict[str, Any]:
    meta_path = ckpt / META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format {meta.get('format')!r}, this version reads "
            f"{FORMAT_VERSION} (sharded checkpoints)"
        )
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


def _data_parallel_only(world_size: int) -> dict[str, int]:
    """The split of a run whose ranks all hold the whole model (the ``sizes`` default)."""
    return {"tp_size": 1, "cp_size": 1, "dp_size": world_size, "pp_size": 1}


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
