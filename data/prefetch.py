"""The next batches, prepared by a background thread while the step runs.

The producer snapshots the loader's state after every batch it makes and the snapshot
travels with the batch, so :meth:`Prefetcher.state_dict` is the state after the last batch
the *model consumed*, never after the ones still queued: a checkpoint resumes exactly where
training stopped. A thread (not a process) suffices: tokenization in sentencepiece and the
tensor work release the GIL for most of their time, and a thread shares the loader object,
so its state needs no pickling.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch
import torch.distributed as dist

from data.loader import PretrainLoader, gather_lane_states


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Iterator over ``loader``'s batches, up to ``depth`` batches ahead (0: made in the
    caller's thread, as without it). On a CUDA ``device`` the batches are pinned by the
    producer and copied with ``non_blocking=True``."""

    def __init__(
        self, loader: PretrainLoader, depth: int, device: torch.device | None = None
    ) -> None:
        if depth < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {depth}")
        self._loader = loader
        self._depth = depth
        self._device = device if device is not None and device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._consumed: dict[str, Any] | None = None  # state after the last batch handed out

    @property
    def loader(self) -> PretrainLoader:
        return self._loader

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> torch.Tensor:
        if self._depth == 0:
            return self._to_device(self._pin(next(self._loader)))
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, self._consumed = item
        return self._to_device(batch)

    def _pin(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.pin_memory() if self._device is not None else batch

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy is asynchronous: the step's first kernels queue behind it.
        return batch.to(self._device, non_blocking=True) if self._device is not None else batch

    def _start(self) -> None:
        self._consumed = self._loader.state_dict()
        self._stop.clear()
        # The thread holds no reference to self: a dropped Prefetcher stops it (__del__).
        args = (self._loader, self._queue, self._stop, self._device is not None)
        self._thread = threading.Thread(target=_produce, args=args, name="seqboat-data")
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        """Stops the producer and rewinds the loader to the last consumed batch (the
        prefetched ones are dropped; the next batch starts the producer again)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        while not self._queue.empty():
            self._queue.get_nowait()
        if self._consumed is not None:
            self._loader.load_state_dict(self._consumed)

    def state_dict(self, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
        """The loader's state after the last consumed batch (see ``PretrainLoader``)."""
        if self._thread is None:
            return self._loader.state_dict(group)
        return gather_lane_states(self._consumed, group)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self._loader.load_state_dict(state)

    def __del__(self) -> None:
        self._stop.set()


def _produce(
    loader: PretrainLoader, out: queue.Queue[Any], stop: threading.Event, pin: bool
) -> None:
    try:
        while not stop.is_set():
            batch = next(loader)
            _put(out, stop, (batch.pin_memory() if pin else batch, loader.state_dict()))
    except BaseException as error:  # handed to the consumer, raised in its thread
        _put(out, stop, _Failure(error))


def _put(out: queue.Queue[Any], stop: threading.Event, item: Any) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
