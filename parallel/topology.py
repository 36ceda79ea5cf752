"""Where this process sits in the job, and the megatron-core process groups built from it.

Three steps, in this order, so that a bad configuration fails on every rank before any
collective could hang:

1. ``detect_world`` reads the launcher's environment (torchrun, Slurm ``srun``, or nothing);
2. ``validate_sizes`` checks the parallel sizes against the world and the model's dimensions;
3. ``init_distributed`` creates the default process group and megatron-core's
   TP x CP x DP x PP groups, and returns this rank's ``Topology``.

A run of one process with every size 1 may skip step 3 and use ``Topology.single()``, which
creates no process group (megatron-core's ``parallel_state`` then stays uninitialized, so code
that asks it for groups must not run on that path).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel import cpu_compat

# megatron-core's rank order (its docstring says the default is "tp-dp-pp"; the code's is this).
# Pinned here because dp_rank and tp_rank below, and data sharding built on them, assume it:
# tensor-parallel ranks are consecutive (same node), pipeline stages are the outermost split.
RANK_ORDER = "tp-cp-ep-dp-pp"

# Slurm tasks agree on a master port without talking to each other: derive it from the job id.
# 20000-29999 lies below Linux's ephemeral range (32768-60999 by default), so no outgoing
# connection on the master node can be holding the port.
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 10000


@dataclass(frozen=True)
class World:
    """Where this process sits, as the launcher told it, before any collective."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


# Port 0: a one-process group's store never receives a connection, so any free port does.
_SINGLE_WORLD = World(0, 1, 0, "127.0.0.1", 0, "single")


def detect_world(env: Mapping[str, str] | None = None) -> World:
    """The ``World`` of this process from ``env`` (default: ``os.environ``).

    torchrun's ``RANK``/``WORLD_SIZE`` win; else a Slurm task started by ``srun``; else one
    process. A Slurm batch shell (no ``srun``) sets ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` to
    the job's task count while being a single process, so Slurm is recognized by
    ``SLURM_STEP_ID``, which only ``srun`` sets: otherwise rank 0 would wait for ranks that
    were never started.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torchrun_world(env)
    if "SLURM_STEP_ID" in env:
        return _slurm_world(env)
    return _SINGLE_WORLD


def _torchrun_world(env: Mapping[str, str]) -> World:
    rank, world_size, local_rank = _ranks(env, "RANK", "WORLD_SIZE", "LOCAL_RANK")
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=_required(env, "MASTER_ADDR"),
        master_port=_port(env, "MASTER_PORT"),
        launcher="torchrun",
    )


def _slurm_world(env: Mapping[str, str]) -> World:
    rank, world_size, local_rank = _ranks(env, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    if env.get("MASTER_PORT"):
        port = _port(env, "MASTER_PORT")
    else:
        port = _SLURM_PORT_BASE + _natural(env, "SLURM_JOB_ID") % _SLURM_PORT_SPAN
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env),
        master_port=port,
        launcher="slurm",
    )


def _first_slurm_host(env: Mapping[str, str]) -> str:
    # The step's node list is the one the tasks run on; the job's may hold nodes outside it.
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        if env.get(name):
            return expand_nodelist(env[name])[0]
    raise ValueError(
        "cannot find the master address: set MASTER_ADDR, SLURM_STEP_NODELIST or SLURM_JOB_NODELIST"
    )


def _ranks(env: Mapping[str, str], *names: str) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables ``names`` in that order."""
    rank, size, local = (_natural(env, name) for name in names)
    if size < 1:
        raise ValueError(f"{names[1]}={size} must be at least 1")
    for name, value in ((names[0], rank), (names[2], local)):
        if value >= size:
            raise ValueError(f"{name}={value} must be below {names[1]}={size}")
    return rank, size, local


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ValueError(f"{name} is not set")
    return value


def _natural(env: Mapping[str, str], name: str) -> int:
    raw = _required(env, name)
    # Stricter than int(): " 3", "+3" and "3_0" are garbled, not numbers.
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"{name}={raw!r} is not a non-negative integer")
    return int(raw)


def _port(env: Mapping[str, str], name: str) -> int:
    port = _natural(env, name)
    if not 1 <= port <= 65535:
        raise ValueError(f"{name}={port} is not a TCP port (1-65535)")
    return port


_HOST_TEXT = re.compile(r"[A-Za-z0-9._-]*")
_ID_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm host list, in Slurm's order, without calling ``scontrol``.

    ``node[01-04,07]`` -> node01..node04, node07 (zero padding kept); several bracket
    groups in one name expand as a cartesian product, the first group varying slowest.
    """
    try:
        return [host for expr in _split_top_level(nodelist) for host in _expand_expr(expr)]
    except ValueError as err:
        raise ValueError(f"bad Slurm node list {nodelist!r}: {err}") from None


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas outside brackets (``a,b[1,3]`` is two expressions)."""
    exprs, start, inside = [], 0, False
    for i, char in enumerate(nodelist):
        if char == "[":
            if inside:
                raise ValueError("nested '['")
            inside = True
        elif char == "]":
            if not inside:
                raise ValueError("']' without '['")
            inside = False
        elif char == "," and not inside:
            exprs.append(nodelist[start:i])
            start = i + 1
    if inside:
        raise ValueError("'[' without ']'")
    exprs.append(nodelist[start:])
    return exprs


def _expand_expr(expr: str) -> list[str]:
    # Brackets are balanced and flat here, so the parts alternate: text, ids, text, ..., text.
    parts = re.split(r"\[([^\]]*)\]", expr)
    if parts == [""]:
        raise ValueError("empty host name")
    choices = []
    for i, part in enumerate(parts):
        if i % 2:
            choices.append(_expand_ids(part))
        elif _HOST_TEXT.fullmatch(part):
            choices.append([part])
        else:
            raise ValueError(f"invalid characters in {part!r}")
    return ["".join(pieces) for pieces in itertools.product(*choices)]


def _expand_ids(idlist: str) -> list[str]:
    ids = []
    for item in idlist.split(","):
        match = _ID_RANGE.fullmatch(item)
        if match is None:
            raise ValueError(f"bad range {item!r} in [{idlist}]")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"reversed range {item!r}")
        # Slurm pads every number of a range to the width of its lower bound.
        ids += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return ids


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


@dataclass(frozen=True)
class Topology:
    """This rank's place in the initialized process groups."""

    world: World
    sizes: ParallelSizes
    tp_rank: int
    dp_rank: int
    dp_size: int
    pp_rank: int
    cp_rank: int
    backend: str  # "gloo" | "nccl"
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one rank that logs, writes metadata and reports."""
        return self.world.rank == 0

    @classmethod
    def single(cls) -> Topology:
        """Rank 0 of a one-process run, without creating any process group.

        ``backend`` names the one ``init_distributed`` would pick; nothing was initialized.
        """
        backend, device = _backend_and_device(None, local_rank=0)
        return cls(
            world=_SINGLE_WORLD,
            sizes=ParallelSizes(),
            tp_rank=0,
            dp_rank=0,
            dp_size=1,
            pp_rank=0,
            cp_rank=0,
            backend=backend,
            device=device,
        )


def init_distributed(
    sizes: ParallelSizes,
    world: World | None = None,
    backend: str | None = None,
    timeout_s: float = 300,
) -> Topology:
    """Create the default process group and megatron-core's model-parallel groups.

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
    # (detection, validation, Topology.single) must stay cheap for launchers and tools.
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        context_parallel_size=sizes.context,
        distributed_timeout_minutes=math.ceil(timeout_s / 60),
        order=RANK_ORDER,
    )
    return Topology(
        world=world,
        sizes=sizes,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(with_context_parallel=False),
        dp_size=mpu.get_data_parallel_world_size(with_context_parallel=False),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        cp_rank=mpu.get_context_parallel_rank(),
        backend=backend,
        device=device,
    )


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
