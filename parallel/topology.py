"""The parallel sizes a run asks for, checked against the world, and the process groups.

Three steps, in this order, so that a bad configuration fails on every rank before any
collective could hang:

1. ``parallel.world.detect_world`` reads the launcher's environment (torchrun, Slurm
   ``srun``, or nothing);
2. ``validate_sizes`` checks the parallel sizes against the world and the model's dimensions;
3. ``init_distributed`` creates the default process group and megatron-core's
   TP x CP x DP x PP groups, and returns this rank's ``ParallelDims``.

A run of one process with every size 1 may skip step 3 and use ``ParallelDims.single()``,
which creates no process group (megatron-core's ``parallel_state`` then stays uninitialized,
so code that asks it for groups must not run on that path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel import cpu_compat
from parallel.dims import ParallelDims
from parallel.world import World, detect_world

# megatron-core's rank order (its docstring says the default is "tp-dp-pp"; the code's is this).
# Pinned here because dp_rank and tp_rank, and data sharding built on them, assume it:
# tensor-parallel ranks are consecutive (same node), pipeline stages are the outermost split.
RANK_ORDER = "tp-cp-ep-dp-pp"


@dataclass(frozen=True)
class ParallelSizes:
    """How many ranks split each model; data parallelism takes the rest of the world."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} parallel size must be >= 1, got {self}")

    @property
    def model_parallel(self) -> int:
        """Ranks holding one copy of the model: tensor x pipeline x context."""
        return self.tensor * self.pipeline * self.context

    def data(self, world_size: int) -> int:
        """Data-parallel size; ``ValueError`` if ``world_size`` does not split evenly."""
        if world_size < 1:
            raise ValueError(f"world size {world_size} must be at least 1")
        if world_size % self.model_parallel:
            raise ValueError(
                f"world size {world_size} is not a multiple of tensor x pipeline x context = "
                f"{self.tensor} x {self.pipeline} x {self.context} = {self.model_parallel}"
            )
        return world_size // self.model_parallel


def validate_sizes(world_size: int, sizes: ParallelSizes, divisible: Mapping[str, int]) -> None:
    """Fail before any collective if ``sizes`` cannot run on ``world_size`` ranks.

    ``divisible`` names dimensions that tensor parallelism splits (e.g. ``{"model.width": 512,
    "padded vocabulary": 32768}``); each must be a multiple of ``sizes.tensor``.
    """
    sizes.data(world_size)
    for key, value in divisible.items():
        if value % sizes.tensor:
            raise ValueError(
                f"{key}={value} is not divisible by the tensor-parallel size {sizes.tensor}"
            )


def init_distributed(
    sizes: ParallelSizes,
    world: World | None = None,
    backend: str | None = None,
    timeout_s: float = 300,
    *,
    sequence_parallel: bool = False,
    dispatch: str = "off",
) -> ParallelDims:
    """Create the default process group and megatron-core's model-parallel groups; this
    rank's ``ParallelDims`` (with the features ``sequence_parallel`` and ``dispatch``).

    Works for one process too (a one-rank group), so callers can treat every run alike.
    ``timeout_s`` bounds every collective: the default group's exactly, megatron-core's groups
    rounded up to whole minutes (its unit).
    """
    world = detect_world() if world is None else world
    validate_sizes(world.world_size, sizes, {})
    backend, device = _backend_and_device(backend, world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cpu_compat.install()
    dist.init_process_group(
        backend,
        init_method=f"tcp://{_url_host(world.master_addr)}:{world.master_port}",
        rank=world.rank,
        world_size=world.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    # Imported here: megatron.core takes seconds to import, and everything above this line
    # (detection, validation, ParallelDims.single) must stay cheap for launchers and tools.
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        context_parallel_size=sizes.context,
        distributed_timeout_minutes=math.ceil(timeout_s / 60),
        order=RANK_ORDER,
    )
    return ParallelDims.from_parallel_state(
        world, sequence_parallel=sequence_parallel, dispatch=dispatch, backend=backend,
        device=device,
    )  # fmt: skip


def shutdown() -> None:
    """Tear down megatron-core's groups and the default group; a no-op if none exists."""
    if not dist.is_initialized():
        return
    # Without this barrier gloo occasionally aborts at exit (a rank leaves while a peer
    # still talks to it): 1 run in 8 measured, 0 in 8 with it.
    dist.barrier()
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    dist.destroy_process_group()


def _backend_and_device(backend: str | None, local_rank: int) -> tuple[str, torch.device]:
    if torch.cuda.is_available():
        return backend or "nccl", torch.device("cuda", local_rank)
    return backend or "gloo", torch.device("cpu")


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr  # an IPv6 address needs brackets in a URL
