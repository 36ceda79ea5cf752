"""Writing checkpoints in the background (``checkpoint.async``).

The step that saves only stages the checkpoint (``pretrain/checkpoint.py``
``stage_checkpoint``: tensors copied to host memory, small files written); a thread then
writes the shards and the rank file and publishes the checkpoint (``write_checkpoint``:
barrier, checksums, ``meta.json``, rename, ``latest``). The thread's collectives run on a
gloo group of their own, created once by every rank, so that they never interleave with the
training's collectives on the default group (torch's ``dcp.async_save`` asks for the same).

One save is in flight at a time: the next save, the end of the run and a stop request wait
for it. A rank killed while its writer runs leaves ``step_X.tmp`` unpublished, so ``latest``
stays on the previous complete checkpoint.
"""

from __future__ import annotations

import threading
import time

import torch.distributed as dist

from pretrain.checkpoint import StagedCheckpoint, write_checkpoint


class BackgroundWriter:
    """Writes one staged checkpoint at a time on a thread. Collective to build (every rank
    creates the writer's group) when a process group is initialized."""

    def __init__(self) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.group = dist.new_group(backend="gloo") if distributed else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # (step, seconds) of the writes completed and not yet reported: a write may end
        # after the next save has started, before anyone asked.
        self._written: list[tuple[int, float]] = []
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, staged: StagedCheckpoint) -> None:
        """Starts writing ``staged`` (after the save in flight, if any, is complete)."""
        self.join()

        def write() -> None:
            start = time.perf_counter()
            try:
                write_checkpoint(staged, self.group)
            except BaseException as e:  # re-raised in the training thread by wait()
                self._error = e
            else:
                with self._lock:
                    self._written.append((staged.step, time.perf_counter() - start))

        # A daemon: a process that dies mid-write leaves an unpublished step_X.tmp behind.
        self._thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Blocks until the save in flight is published; a failed write raises here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
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
        """Waits for the save in flight, then takes the writer's group down in step with the
        other ranks (collective): a rank that exits while a peer's group still talks to it
        makes gloo abort that peer."""
        self.join()
        if self.group is not None:
            dist.barrier(self.group)
            dist.destroy_process_group(self.group)
            self.group = None
