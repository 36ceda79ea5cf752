"""Run a function on N local processes that form a gloo world (tests and benchmarks).

Each call gets a free port, a hard timeout, and leaves no process behind: the first failing
rank's traceback is raised in the calling process.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_ports(n: int) -> list[int]:
    """``n`` ports free now, below the ephemeral range.

    Not port 0's pick: that comes from the ephemeral range, where gloo's own connections
    take ports too, and one may grab a port found here before its store listens on it.
    """
    ports: list[int] = []
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports found")


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Runs ``fn(rank, world, *args)`` on ``world`` spawned processes (the environment has
    MASTER_ADDR/PORT, RANK, WORLD_SIZE set; ``fn`` initializes its own process group) and
    returns the per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    (port,) = free_ports(1)
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


@contextlib.contextmanager
def gloo_world(rank: int, world: int) -> Iterator[None]:
    """Inside a ``run_ranks`` worker: the gloo process group (megatron-core's CUDA calls
    routed to CPU), torn down on the way out with megatron-core's groups."""
    import torch.distributed as dist

    from parallel import cpu_compat

    cpu_compat.install()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        from megatron.core import parallel_state

        dist.barrier()  # without it gloo sometimes aborts at exit
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def launch_train(
    tmp_path: Path, name: str, nproc: int, args: Sequence[str], env: dict[str, str]
) -> subprocess.Popen:
    """``torchrun --nproc_per_node <nproc> -m pretrain train run.dir=<tmp_path>/<name> ...``
    in the background, in a session of its own (``finish_launch`` kills what is left of
    it), its output in ``<tmp_path>/<name>.log`` (this launch's only: a log a test reads
    must not hold an earlier launch's lines); ``env`` is its whole environment
    (``subprocess_env``)."""
    (port,) = free_ports(1)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "pretrain", "train", "--no-progress", f"run.dir={tmp_path / name}", *args,
    ]  # fmt: skip
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def finish_launch(proc: subprocess.Popen, pids: Sequence[int] = (), timeout: float = 300) -> int:
    """Waits for a launcher started with ``start_new_session=True``, then kills whatever is
    left of it: its session and each rank's own (torchrun starts every rank in a new
    session). Returns its exit status."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        for group in (proc.pid, *pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        proc.wait()


def paused_ranks(marker: Path, ranks: int, timeout: float = 300) -> list[int]:
    """The pids of ``ranks`` ranks, once all wait in a save paused by the checkpoint test
    hooks (each writes ``<marker>.rank<N>`` holding its pid)."""
    deadline = time.monotonic() + timeout
    files = [Path(f"{marker}.rank{r}") for r in range(ranks)]
    while not all(f.is_file() and f.read_text() for f in files):
        assert time.monotonic() < deadline, "the ranks never reached the paused save"
        time.sleep(0.2)
    return [int(f.read_text()) for f in files]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a launched run: this process's, without its W&B variables (an
    in-process W&B run leaves its service's address there, and a child would join that
    service, whose run ids outlive a killed child), one thread per rank, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}
