"""Naming the collective that timed out.

A rank that hangs (a deadlocked loader, a dead NIC, a rank that skipped a collective) holds
every other rank in the next collective they share. The process groups' timeout
(``train.timeout_s``) turns that wait into an exception, but gloo's says only "Timed out
waiting 600000ms for recv operation to complete". ``collective_timeout`` reads the exception's
traceback for what a person needs: which collective, over which ranks, called from where.
Every waiting rank reports its own line, so the log shows who waited where and who is
missing. (On GPUs the NCCL flight recorder, which the Slurm script switches on, dumps the
same per rank: ``pretrain/slurm.py``.)
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

# The process exit code of a run that failed in a timed-out collective ("timed out", as
# coreutils' timeout): any code but 0 and the requeue code counts as a failure in the
# Slurm script, which gives up after max_failures_without_progress in a row.
EXIT_COLLECTIVE_TIMEOUT = 124

_C10D = os.path.join("torch", "distributed", "distributed_c10d.py")
_TORCH = os.sep + "torch" + os.sep


@dataclass(frozen=True)
class CollectiveTimeout:
    collective: str  # torch.distributed's function: all_reduce, barrier, broadcast, ...
    ranks: list[int] | None  # the global ranks of its group (None: unknown)
    call_site: str  # the first caller outside torch: "pretrain/stop.py:78 in agreed"
    detail: str  # the backend's own message

    def message(self, rank: int, host: str) -> str:
        over = f"over ranks {self.ranks}" if self.ranks is not None else "over its group"
        return (
            f"rank {rank} on {host}: {self.collective} {over} timed out (train.timeout_s), "
            f"called from {self.call_site}; another rank of that group is hung, dead or in a "
            f"different collective ({self.detail})"
        )


def collective_timeout(error: BaseException) -> CollectiveTimeout | None:
    """What timed out, if ``error`` (or an exception it was raised from) is a collective's
    timeout; else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # An error raised for one that happened in another process (a checkpoint writer's)
        # carries what that process read from its traceback.
        found = getattr(error, "collective_timeout", None) or _from_traceback(error)
        if found is not None:
            return found
        error = error.__cause__ or error.__context__
    return None


def _from_traceback(error: BaseException) -> CollectiveTimeout | None:
    text = str(error)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return None
    frames = list(traceback.walk_tb(error.__traceback__))
    c10d = [f for f, _ in frames if f.f_code.co_filename.endswith(_C10D)]
    if not c10d:
        return None
    innermost = c10d[-1]
    callers = [(f, line) for f, line in frames if _TORCH not in f.f_code.co_filename]
    site = "?"
    if callers:
        frame, line = callers[-1]
        site = f"{_short(frame.f_code.co_filename)}:{line} in {frame.f_code.co_name}"
    return CollectiveTimeout(
        innermost.f_code.co_name, _group_ranks(innermost.f_locals.get("group")), site,
        text.strip().splitlines()[0][-160:],
    )  # fmt: skip


def _group_ranks(group: object) -> list[int] | None:
    import torch.distributed as dist

    try:
        if group is None:
            return list(range(dist.get_world_size()))
        return dist.get_process_group_ranks(group)
    except Exception:  # the group may be gone by now; the rest of the report still stands
        return None


def _short(path: str) -> str:
    """A path relative to the working directory when below it (the repository's files)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
