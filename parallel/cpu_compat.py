"""Run megatron-core's tensor-parallel code paths on CPU-only machines (gloo).

Megatron-core allocates communication buffers with ``device=torch.cuda.current_device()``
and touches CUDA RNG state, streams and events. Without CUDA, those calls are routed to the
CPU here; with CUDA present, ``install()`` changes nothing. Nothing of megatron-core is
copied or forked: only the few ``torch.cuda`` entry points it calls are answered.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

_INSTALLED = False


class _NoStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _NoEvent:
        return _NoEvent()


class _NoEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


def install() -> None:
    """Idempotent. A no-op when CUDA is available."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NoStream()
    torch.cuda.default_stream = lambda device=None: _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoEvent
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    _route_rng_tracker_to_cpu()
    _INSTALLED = True


def _route_rng_tracker_to_cpu() -> None:
    """Megatron's model-parallel RNG tracker forks the CUDA generator; fork the CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = None, clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(state)

    # Its fork() warns whenever the CPU generator moved inside the fork, which on a CPU is
    # exactly what forking is for.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    # ``CudaRNGStatesTracker.add`` reads and seeds the CUDA generator through torch.cuda.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = _seed_cpu_generator


def _seed_cpu_generator(seed: int) -> None:
    torch.manual_seed(seed)


class _CpuAllocations:
    """Stands in for the ``torch`` module inside megatron-core's pipeline schedules: every
    attribute is torch's, except ``zeros``, whose hard-coded ``device="cuda"`` (a token
    counter) becomes the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


_SCHEDULES_ROUTED = False


def route_schedules_to_cpu() -> None:
    """Idempotent; a no-op when CUDA is available. Imports megatron-core's schedules (slow),
    so it is called by the pipeline code, not by ``install``."""
    global _SCHEDULES_ROUTED
    if _SCHEDULES_ROUTED or torch.cuda.is_available():
        return
    install()
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuAllocations()
    _SCHEDULES_ROUTED = True
