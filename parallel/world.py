"""Where this process sits in the job, as its launcher tells it, before any collective.

``detect_world`` reads torchrun's variables, else a Slurm task's (``srun``), else it is one
process; ``expand_nodelist`` parses Slurm host lists without calling ``scontrol``.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

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
SINGLE_WORLD = World(0, 1, 0, "127.0.0.1", 0, "single")


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
    return SINGLE_WORLD


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
