"""Host memory shared with the checkpoint writer process (``checkpoint.async``).

A background save copies the tensors it writes into this memory at the step; the writer
process (``pretrain/checkpoint_writer.py``) maps the same memory and writes from it. So a
save hands the writer only where each tensor lies (a few numbers each: ``dumps``/``loads``),
never the tensors' bytes.

The memory is one anonymous memory file (``memfd_create``) per layout of buffers, passed to
the writer as a file descriptor: it has no name, so a process that dies leaves nothing
behind in ``/dev/shm``; the kernel frees it once both processes have dropped it. A new
layout (another set of tensors or shapes, the first save of a run) gets a new file; a save
whose layout did not change reuses the buffers, already touched: a copy into them is several
times faster than into fresh memory.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import pickle
from typing import Any

import torch

_ALIGN = 64  # bytes: every buffer starts on a cache line (and any dtype's alignment)

# A tensor of the shared memory, as pickled for the writer: (generation, byte offset, shape,
# strides, dtype).
Ref = tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]


class HostMemory:
    """One mapping of the shared memory, on either side: the training process allocates
    it (``buffers``), the writer maps what it was sent (``attach``)."""

    def __init__(self) -> None:
        self.generation = 0  # which memory file: the writer maps each new one once
        self.size = 0
        self._bytes: torch.Tensor | None = None  # the whole mapping, as uint8
        self._layout: list[tuple[Any, tuple[int, ...], torch.dtype]] | None = None
        self._buffers: dict[Any, torch.Tensor] = {}
        self._fd: int | None = None  # the memory file of this generation, until sent

    def buffers(self, specs: dict[Any, tuple[torch.Size, torch.dtype]]) -> dict[Any, torch.Tensor]:
        """A buffer per key of ``specs`` (shape, dtype), all in the shared memory: the same
        buffers as the last call when ``specs`` is the same (in order), else a new memory
        file. The caller must not reuse them while the writer reads them."""
        layout = [(key, tuple(shape), dtype) for key, (shape, dtype) in specs.items()]
        if layout != self._layout:
            self._allocate(layout)
        return self._buffers

    def _allocate(self, layout: list[tuple[Any, tuple[int, ...], torch.dtype]]) -> None:
        offsets, size = [], 0
        for _, shape, dtype in layout:
            offsets.append(size)
            nbytes = math.prod(shape) * dtype.itemsize
            size += -(-nbytes // _ALIGN) * _ALIGN
        self.release()
        fd = os.memfd_create("seqboat-checkpoint")
        os.ftruncate(fd, max(size, 1))
        self._map(fd, max(size, 1))
        self._fd = fd
        self.generation += 1
        self._layout = layout
        self._buffers = {
            key: self._bytes.narrow(0, offset, math.prod(shape) * dtype.itemsize)
            .view(dtype)
            .view(shape)
            for (key, shape, dtype), offset in zip(layout, offsets, strict=True)
        }

    def take_new_file(self) -> tuple[int, int] | None:
        """(file descriptor, size) of a memory file the writer has not mapped yet, handed
        over to the caller (who sends it and closes it); None when there is none."""
        if self._fd is None:
            return None
        fd, self._fd = self._fd, None
        return fd, self.size

    def attach(self, generation: int, fd: int, size: int) -> None:
        """The writer's side: maps the memory file ``fd`` (closed here) of ``generation``."""
        self.release()
        try:
            self._map(fd, size)
        finally:
            os.close(fd)
        self.generation = generation

    def _map(self, fd: int, size: int) -> None:
        # The tensor keeps the mapping alive (its buffer): no explicit unmap, which would
        # fail while a view of it exists; it goes with the last tensor that uses it.
        self._bytes = torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)
        self.size = size

    def release(self) -> None:
        """Drops this side's mapping (and an unsent memory file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._bytes, self._layout, self._buffers, self.size = None, None, {}, 0

    def tensor(
        self, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """The tensor of the mapping at byte ``offset`` with ``shape``, ``stride``, ``dtype``."""
        assert self._bytes is not None, "no shared memory mapped"
        span = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else 0
        data = self._bytes.narrow(0, offset, span * dtype.itemsize).view(dtype)
        return data.as_strided(shape, stride)

    def ref(self, t: torch.Tensor) -> Ref | None:
        """Where ``t`` lies in this memory; None if it is not in it."""
        if self._bytes is None or t.device.type != "cpu" or t.numel() == 0:
            return None
        offset = t.data_ptr() - self._bytes.data_ptr()
        if not 0 <= offset < self.size:
            return None
        return self.generation, offset, tuple(t.shape), tuple(t.stride()), t.dtype


def dumps(obj: Any, memory: HostMemory) -> bytes:
    """``obj`` pickled, its tensors that lie in ``memory`` by place, the others by value."""

    class _Pickler(pickle.Pickler):
        # Called for objects of other than the built-in types (unlike ``persistent_id``,
        # called for every int and str too: 3-4x the time of the whole pickling).
        def reducer_override(self, value: Any) -> Any:
            if isinstance(value, torch.Tensor) and (ref := memory.ref(value)) is not None:
                return _tensor_of_loading_memory, (ref,)
            return NotImplemented

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


# The mapping ``loads`` rebuilds tensors in, while it runs (the writer is single-threaded).
_loading: HostMemory | None = None


def loads(data: bytes, memory: HostMemory) -> Any:
    """The object ``dumps`` pickled, its tensors in place in ``memory`` (the writer's
    mapping of the same generation)."""
    global _loading
    _loading = memory
    try:
        return pickle.loads(data)
    finally:
        _loading = None


def _tensor_of_loading_memory(ref: Ref) -> torch.Tensor:
    generation, offset, shape, stride, dtype = ref
    memory = _loading
    if memory is None or generation != memory.generation:
        mapped = memory.generation if memory is not None else None
        raise RuntimeError(f"a tensor of shared memory {generation}; mapped: {mapped}")
    return memory.tensor(offset, shape, stride, dtype)
