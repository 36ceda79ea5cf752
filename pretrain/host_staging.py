"""Staging a background save's tensors in host memory (``checkpoint.async``).

At the step that saves, the tensors this rank writes are copied into host memory shared
with the writer process (``pretrain/host_memory.py``), and megatron-core's sharded state
dict describing those copies is handed to the writer with the rest of the save.

Building that sharded state dict is Python work per tensor (megatron's ``ShardedTensor``s,
the copy of each into its buffer, its preprocessing, pickling it for the writer): on the
tiny model's 332 tensors, most of the ~10 ms a save held training. Yet while the tensors'
keys, shapes and dtypes do not change, which in a run they do not after the first save,
that dict is the same from save to save: the same metadata, the same buffers. So it is
built, preprocessed and sent once per layout; a save of an unchanged layout only copies the
tensors' bytes into the same buffers, and the writer reuses the dict it was sent last.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pretrain.checkpoint import PreparedShards, preprocess_sharded, timed
from pretrain.host_memory import HostMemory

# The layout a prepared sharded state dict is valid for: (key, shape, dtype) of each tensor.
Signature = list[tuple[str, torch.Size, torch.dtype]]


@dataclass
class _Plan:
    signature: Signature
    copies: list[tuple[str, Tensor]]  # (key, its buffer shaped like the source tensor)
    prepared: PreparedShards


class HostStaging:
    """The host copies of one rank's background saves and the prepared sharded state dict
    that describes them, kept while the layout does not change. The caller must not stage
    a save before the writer is done with the previous one (the buffers are reused)."""

    def __init__(self) -> None:
        self.memory = HostMemory()  # shared with the writer process
        self.builds = 0  # how many times the sharded state dict was built
        self._plan: _Plan | None = None

    def stage(
        self,
        tensors: dict[str, Tensor],
        build: Callable[[], dict[str, Any]],
        timings: dict[str, float],
    ) -> PreparedShards:
        """Copies ``tensors`` (by key: the tensors of the sharded state dict ``build``
        returns, flat, keyed like it) into host memory; returns the prepared sharded state
        dict of those copies: the previous one, unless the keys, shapes or dtypes of
        ``tensors`` changed (then ``build`` is called). ``timings`` gets the seconds of
        ``state_dict`` (building), ``host_copy`` and ``preprocess``."""
        signature = [(key, t.shape, t.dtype) for key, t in tensors.items()]
        plan = self._plan
        if plan is None or plan.signature != signature:
            self._plan = None
            with timed(timings, "state_dict"):
                sharded = build()
                self.builds += 1
                copies, sharded = self._host_tensors(sharded, tensors)
            with timed(timings, "preprocess"):
                prepared = preprocess_sharded(sharded)
            plan = self._plan = _Plan(signature, copies, prepared)
        with timed(timings, "host_copy"), torch.no_grad():
            on_gpu = False
            for key, buffer in plan.copies:
                source = tensors[key]
                on_gpu |= source.device.type != "cpu"
                buffer.copy_(source, non_blocking=True)
            if on_gpu:
                torch.cuda.synchronize()  # the non-blocking copies are complete
        return plan.prepared

    def _host_tensors(
        self, sharded: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[list[tuple[str, Tensor]], dict[str, Any]]:
        """Buffers in the shared memory for the sharded tensors this rank writes (main
        replicas), and ``sharded`` with those as their data. The copies another rank writes
        (data/context-parallel) keep their metadata only: their data is never read, and
        copying it would multiply the copy by the number of copies."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

        if not all(isinstance(v, ShardedTensor) for v in sharded.values()):
            raise TypeError("host staging takes a flat dict of ShardedTensors")
        if sharded.keys() != tensors.keys():
            raise ValueError("the sharded state dict and the tensors name different keys")
        written = {k: v for k, v in sharded.items() if is_main_replica(v.replica_id)}
        buffers = self.memory.buffers({k: (v.data.shape, v.data.dtype) for k, v in written.items()})
        copies = []
        for key, buffer in buffers.items():
            if buffer.numel() != tensors[key].numel():
                raise ValueError(f"{key}: the sharded tensor is not the whole tensor")
            copies.append((key, buffer.view(tensors[key].shape)))
        staged = {k: _with_data(v, buffers.get(k)) for k, v in sharded.items()}
        return copies, staged


def _with_data(value: Any, data: Tensor | None) -> Any:
    """A shallow copy of a ShardedTensor with other data (``dataclasses.replace`` would
    re-run megatron's checks of the unchanged metadata)."""
    out = copy.copy(value)
    out.data = data
    return out
