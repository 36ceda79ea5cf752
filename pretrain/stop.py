"""Stop requests: SIGUSR1 or SIGTERM (Slurm's ``--signal``, a preemption) make a run finish
its step, save and leave with "requeue me".

Such a request may come during the seconds to minutes of importing torch and megatron-core
and building the model; by default SIGUSR1 would kill the process. ``record_early_stops``
runs before those imports (this module imports nothing heavy at import time) and remembers
the request; ``StopSignals`` takes over while the loop runs.
"""

from __future__ import annotations

import os
import signal
import time
from types import TracebackType
from typing import Any

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_requested = {"stop": False}


def record_early_stops() -> None:
    """From now until the trainer installs its handlers, remember SIGUSR1 / SIGTERM instead
    of dying by them."""

    def remember(signum: int, frame: Any) -> None:
        _requested["stop"] = True

    for sig in SIGNALS:
        signal.signal(sig, remember)


def early_stop_requested() -> bool:
    return _requested["stop"]


class StopSignals:
    """While the loop runs (``with StopSignals() as stop``), a stop signal only sets
    ``stop.requested``: the step finishes and the loop saves at its end. The previous
    handlers come back on exit, except after ``leave()``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        def request_stop(signum: int, frame: Any) -> None:
            self.requested = True

        self.requested = early_stop_requested()
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread: leave signals to the caller
                break
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, distributed: bool, device: Any) -> bool:
        """Whether any rank was asked to stop (collective): all ranks save and leave at the
        same step."""
        if not distributed:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def leave(self) -> None:
        """The process is on its way out with "requeue me": srun --kill-on-bad-exit answers
        the first rank's exit with SIGTERM to the others, who must leave the same way, not
        die by the signal. So SIGTERM is ignored from now on, also after ``__exit__``."""
        self._previous.pop(signal.SIGTERM, None)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Test hook: SEQBOAT_HANG_AT=<step>:<rank> makes that rank stop taking part after the step
# (it sleeps where the others enter the step's stop agreement, a collective), as a deadlocked
# or wedged rank would; the others must fail within train.timeout_s, naming the collective.
HANG_ENV = "SEQBOAT_HANG_AT"


def hang_for_tests(step: int, rank: int) -> None:
    at, _, who = os.environ.get(HANG_ENV, "").partition(":")
    if at and int(at) == step and int(who) == rank:
        while True:
            time.sleep(1)
