"""Writing checkpoints in the background (``checkpoint.async``).

The step that saves only stages the checkpoint (``pretrain/checkpoint.py``
``stage_checkpoint``: tensors copied to host memory, megatron's factories applied, the rank
file serialized; no collective, no process group needed); a thread then does the rest
(``write_checkpoint``: rank 0's ``common.pt``, the sharding check when the sharding changed,
torch DCP's plan and the shard files, the rank file, barriers, checksums, ``meta.json``,
rename, ``latest``). The thread's collectives run on a gloo group of their own, created once
by every rank, so that they never interleave with the training's collectives on the default
group (torch's ``dcp.async_save`` asks for the same). A process without a process group has
no collective to interleave with: its writer makes the one-rank group megatron asks the rank
of for the time of a write (``pretrain/checkpoint.py`` ``_write_sharded``).

One save is in flight at a time: the next save, the end of the run and a stop request wait
for it. A rank killed while its writer runs leaves ``step_X.tmp`` unpublished, so ``latest``
stays on the previous complete checkpoint.
"""

from __future__ import annotations

import queue
import threading
import time

import torch.distributed as dist

from pretrain.checkpoint import StagedCheckpoint, write_checkpoint


class BackgroundWriter:
    """Writes one staged checkpoint at a time on a thread of its own. Collective to build
    (every rank creates the writer's group) when a process group is initialized."""

    def __init__(self) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.group = dist.new_group(backend="gloo") if distributed else None
        self._jobs: queue.SimpleQueue[StagedCheckpoint | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        # (step, seconds) of the writes completed and not yet reported: a write may end
        # after the next save has started, before anyone asked.
        self._written: list[tuple[int, float]] = []
        self._lock = threading.Lock()
        # One thread for the writer's life, waiting for work: a save hands its checkpoint
        # over without waiting for a new thread to start (a few ms of the save's blocking
        # time otherwise). A daemon: a process that dies mid-write leaves an unpublished
        # step_X.tmp behind.
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="checkpoint-writer", daemon=True
        )
        self._thread.start()

    @property
    def in_flight(self) -> bool:
        return not self._idle.is_set()

    def submit(self, staged: StagedCheckpoint) -> None:
        """Starts writing ``staged`` (after the save in flight, if any, is complete)."""
        self.join()
        self._idle.clear()
        self._jobs.put(staged)

    def _run(self) -> None:
        while (staged := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                write_checkpoint(staged, self.group)
            except BaseException as e:  # re-raised in the training thread by join()
                self._error = e
            else:
                with self._lock:
                    self._written.append((staged.step, time.perf_counter() - start))
            finally:
                del staged  # hold nothing of it (rank file, tensors) until the next save
                self._idle.set()

    def join(self) -> None:
        """Blocks until the save in flight is published; a failed write raises here."""
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"the background checkpoint write failed: {error}") from error

    def wait(self) -> list[tuple[int, float]]:
        """``join``, then (step, seconds the writing took) of each save completed since the
        last call to ``wait`` or ``poll``."""
        self.join()
        return self.poll()

    def poll(self) -> list[tuple[int, float]]:
        """(step, seconds) of each save completed since the last call, without blocking."""
        with self._lock:
            written, self._written = self._written, []
        return written

    def close(self) -> None:
        """Waits for the save in flight, stops the thread, then takes the writer's group
        down in step with the other ranks (collective): a rank that exits while a peer's
        group still talks to it makes gloo abort that peer."""
        if self._thread is None:
            return
        try:
            self.join()
        finally:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if self.group is not None:
            dist.barrier(self.group)
            dist.destroy_process_group(self.group)
            self.group = None
