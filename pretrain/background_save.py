"""Writing checkpoints in the background (``checkpoint.async``), in a writer process.

The step that saves only stages the checkpoint (tensors copied into host memory shared
with the writer, ``pretrain/host_staging.py``; the rest of ``pretrain/checkpoint.py``'s
``stage_checkpoint``: the rank file serialized; no collective, no process group needed)
and hands it over: the sharded state dict when its layout changed, with each tensor as its
place in that memory (``pretrain/host_memory.py``), and the rest pickled. The writer
process (``pretrain/checkpoint_writer.py``) does the rest (``write_checkpoint``: rank 0's
``common.pt``, the sharding check when the sharding changed, torch DCP's plan and the shard
files, the rank file, barriers, checksums, ``meta.json``, rename, ``latest``).

A process, not a thread: that work is mostly Python, and a thread doing it holds the GIL the
training thread needs between its kernels. Measured on the tiny model (2-core CPU, one
rank), the steps after a thread's save lost as much time as a synchronous save blocks, which
undid the point of saving in the background (``bench/checkpoint_io.py``'s "training time
lost"; ``bench/RESULTS.md``). torch DCP's ``async_save`` offers a process for the same
reason; Megatron-LM writes from a process too.

The writers of all ranks form a gloo world of their own (rendezvous on the job's store
under a prefix rank 0 draws), so their collectives never interleave with the training's. One
save is in flight at a time: the next save, the end of the run and a stop request wait for
it. A rank killed while its writer runs takes the writer with it and leaves ``step_X.tmp``
unpublished, so ``latest`` stays on the previous complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import uuid
from multiprocessing.connection import Connection

import torch.distributed as dist

from parallel.timeouts import CollectiveTimeout
from parallel.world import detect_world
from pretrain.checkpoint import ShardingCheck, StagedCheckpoint
from pretrain.host_memory import dumps
from pretrain.host_staging import HostStaging


class BackgroundWriteError(RuntimeError):
    """A background checkpoint write failed (in the writer process); ``collective_timeout``
    names the collective when it was one that timed out (``parallel/timeouts.py`` reads it,
    so the CLI reports it as it reports the training's own)."""

    def __init__(self, message: str, timeout: CollectiveTimeout | None = None) -> None:
        super().__init__(message)
        self.collective_timeout = timeout


class BackgroundWriter:
    """Writes one staged checkpoint at a time in a writer process of its own, started here.
    Collective to build when a process group is initialized (rank 0 names the writers'
    rendezvous); ``timeout_s`` bounds the writers' collectives. Build it on the thread that
    lives as long as the run (the main thread): the writer dies with the thread that
    started it (``PR_SET_PDEATHSIG``)."""

    def __init__(self, timeout_s: float = 600) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        spec: dict[str, object] = {
            "rank": rank, "world_size": world_size, "timeout_s": timeout_s,
            "parent": os.getpid(),
        }  # fmt: skip
        if world_size > 1:
            world = detect_world()  # where the job's store is: the training's rendezvous
            if world.world_size != world_size:
                raise RuntimeError(
                    "checkpoint.async: the writers meet on the launcher's store "
                    "(MASTER_ADDR/MASTER_PORT, as torchrun or srun set them), which this "
                    f"process does not name (it sees a world of {world.world_size}, the "
                    f"process group has {world_size})"
                )
            prefix = [uuid.uuid4().hex if rank == 0 else None]
            dist.broadcast_object_list(prefix, src=0)
            spec |= {"host": world.master_addr, "port": world.master_port}
            spec["prefix"] = f"seqboat/checkpoint-writer/{prefix[0]}"
        ours, theirs = socket.socketpair()
        spec["fd"] = theirs.fileno()
        # No GPU for the writer: its tensors are in host memory, and a CUDA context would
        # take device memory on every rank's GPU (megatron-core's CUDA calls go to the CPU).
        self._process: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "pretrain.checkpoint_writer", json.dumps(spec)],
            pass_fds=[theirs.fileno()], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )  # fmt: skip
        theirs.close()
        self._socket = ours
        self._conn = Connection(os.dup(ours.fileno()))
        # The host copies of the tensors, in memory shared with the writer, and the sharded
        # state dict that describes them (built once per layout).
        self.staging = HostStaging()
        self._sent_builds = 0  # the staging's sharded state dict the writer holds (its count)
        self._ready = False
        self._in_flight: int | None = None  # the step being written
        # (step, seconds) of the writes completed and not yet reported: a write may end
        # after the next save has started, before anyone asked.
        self._written: list[tuple[int, float]] = []
        self.sharding_checks = 0  # how many times the writer ran megatron's sharding check

    def submit(self, staged: StagedCheckpoint) -> None:
        """Starts writing ``staged`` (after the save in flight, if any, is complete). Its
        tensors in ``self.staging.memory`` are sent by place, any others by value; its
        sharded state dict only when ``self.staging`` built a new one since the last submit
        (it keeps the same one while the layout does not change), the writer reusing the one
        it has otherwise. ``staged`` is the last one ``self.staging`` staged."""
        self.join()
        self.await_ready()
        memory = self.staging.memory
        new_file = memory.take_new_file()
        if new_file is not None:  # a new layout of the buffers: the writer maps it once
            fd, size = new_file
            try:
                self._conn.send(("memory", memory.generation, size))
                socket.send_fds(self._socket, [b"m"], [fd])
            finally:
                os.close(fd)
        shards = None
        if self.staging.builds != self._sent_builds:
            shards = dumps((staged.sharded, staged.common), memory)
            self._sent_builds = self.staging.builds
        # The writer keeps its own sharding check: what it checked last is its memory.
        rest = dataclasses.replace(
            staged, sharded=None, common=None, check=ShardingCheck(), timings={}
        )
        self._conn.send(("write", staged.step, dumps(rest, memory), shards))
        self._in_flight = staged.step

    def await_ready(self) -> None:
        """Blocks until the writer has started (its imports, its world): the first save
        waits for it."""
        while not self._ready:
            self._handle(self._recv())

    def _recv(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._process.wait() if self._process is not None else None
            raise BackgroundWriteError(
                f"the checkpoint writer process died (exit code {code})"
            ) from None

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            self._ready = True
        elif kind == "done":
            _, step, seconds, self.sharding_checks = message
            self._written.append((step, seconds))
            self._in_flight = None
        else:  # "error"
            _, text, timeout = message
            self._in_flight = None
            raise BackgroundWriteError(f"the background checkpoint write failed: {text}", timeout)

    def _receive(self, block: bool) -> None:
        while self._in_flight is not None and (block or self._conn.poll()):
            self._handle(self._recv())

    def join(self) -> None:
        """Blocks until the save in flight is published; a failed write raises here."""
        self._receive(block=True)

    def wait(self) -> list[tuple[int, float]]:
        """``join``, then (step, seconds the writing took) of each save completed since the
        last call to ``wait`` or ``poll``."""
        self.join()
        return self.poll()

    def poll(self) -> list[tuple[int, float]]:
        """(step, seconds) of each save completed since the last call, without blocking."""
        self._receive(block=False)
        written, self._written = self._written, []
        return written

    def abort(self) -> None:
        """Kills the writer at once (a run that failed): a save in flight stays unpublished,
        its ``step_X.tmp`` removed by the next restore, as when the process dies."""
        if self._process is None:
            return
        self._process.kill()
        self._release()

    def close(self) -> None:
        """Waits for the save in flight, then stops the writer, which leaves its world in
        step with the other ranks' writers (collective)."""
        if self._process is None:
            return
        try:
            self.join()
        finally:
            with contextlib.suppress(OSError):  # the writer may be gone already
                self._conn.send(None)
            self._release()

    def _release(self) -> None:
        """Once the writer is stopping: waits for it, then drops the channel and memory."""
        self._process.wait()
        self._process = None
        self._conn.close()
        self._socket.close()
        self.staging.memory.release()
