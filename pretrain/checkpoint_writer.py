"""The checkpoint writer process of ``checkpoint.async`` (started by
``pretrain/background_save.py``; not a command for people).

It runs ``write_checkpoint`` (``pretrain/checkpoint.py``) for the staged saves its training
process sends, reading their tensors from the host memory they share
(``pretrain/host_memory.py``). Being a process of its own, its Python work (megatron-core's
and torch DCP's planning, serialization, checksums) never holds the training process's GIL.
The writers of all ranks form a gloo world of their own, so megatron-core's collectives on
the default group are the writers' and never meet the training's.

It dies with its training process (``PR_SET_PDEATHSIG``): a rank killed mid-save leaves its
``step_X.tmp`` unpublished. It ignores the stop signals (SIGUSR1, SIGTERM, SIGINT), which
Slurm and terminals send to the whole process group: the training process decides when a
save in flight is waited for.

Messages over the socket given as its first argument (``multiprocessing.connection``):
in, ``("memory", generation, size)`` followed by the memory file's descriptor, then
``("write", step, dumped StagedCheckpoint without its sharded state dict, dumped
(sharded, common) or None: the same as the last write's)``, ``None`` to stop; out,
``("ready",)`` once the writers' world is up, then per write ``("done", step, seconds,
sharding checks so far)`` or ``("error", message, CollectiveTimeout | None)``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback
import warnings
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """SIGKILL when the training process dies (Linux), also if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # died before the line above
        os._exit(1)


def _join_writers(spec: dict[str, Any]) -> None:
    """The writers' gloo world: the job's store (the training's rendezvous), under a prefix
    all ranks agreed on; one writer alone needs no store."""
    import torch.distributed as dist

    timeout = timedelta(seconds=spec["timeout_s"])
    if spec["world_size"] == 1:
        store: dist.Store = dist.HashStore()
    else:
        job = dist.TCPStore(spec["host"], spec["port"], is_master=False, timeout=timeout)
        store = dist.PrefixStore(spec["prefix"], job)
    dist.init_process_group(
        "gloo", store=store, rank=spec["rank"], world_size=spec["world_size"], timeout=timeout
    )


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    _die_with(spec["parent"])
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    warnings.simplefilter("ignore")  # megatron-core's import notes (Apex, TE): the parent's
    import torch
    import torch.distributed as dist

    from parallel import cpu_compat
    from parallel.timeouts import collective_timeout
    from pretrain import checkpoint
    from pretrain.checkpoint import ShardingCheck, write_checkpoint
    from pretrain.host_memory import HostMemory, dumps, loads

    torch.set_num_threads(1)  # the writer's tensor work is copies; the cores are training's
    # Where the cores are all busy with training, the writer yields them (it has until the
    # next save); on a node with idle cores this changes nothing.
    os.nice(10)
    sock = socket.socket(fileno=spec["fd"])
    conn = Connection(os.dup(spec["fd"]))
    cpu_compat.install()  # megatron's checkpointing calls torch.cuda
    checkpoint.RANK_PID = spec["parent"]  # the test hooks name the rank, not its writer
    _join_writers(spec)
    memory, check = HostMemory(), ShardingCheck()
    shards = dumps((None, None), memory)  # the sharded state dict sent last (pickled)
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the training process is gone: no orderly teardown
            return 1
        if message is None:
            break
        if message[0] == "memory":
            _, generation, size = message
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            memory.attach(generation, fds[0], size)
            continue
        start = time.perf_counter()
        try:
            _, _, rest, new_shards = message
            shards = new_shards if new_shards is not None else shards
            staged = loads(rest, memory)
            # Unpickled for each write: megatron's conversion changes the dict it is given.
            staged.sharded, staged.common = loads(shards, memory)
            staged.check = check  # the writer's: it remembers the sharding it checked
            write_checkpoint(staged)
            del staged
        except BaseException as e:
            text = "".join(traceback.format_exception_only(e)).strip()
            conn.send(("error", text, collective_timeout(e)))
        else:
            conn.send(("done", message[1], time.perf_counter() - start, check.runs))
    dist.barrier()  # in step with the other writers: gloo aborts a peer that left early
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
