"""Stop requests that arrive while a training process is still starting.

Slurm's ``--signal`` (or a preemption's SIGTERM) may come during the seconds to minutes of
importing torch and megatron-core and building the model; by default SIGUSR1 would kill the
process. ``record_early_stops`` runs before those imports (this module imports nothing
heavy) and remembers the request; the trainer then stops at its first step boundary.
"""

from __future__ import annotations

import signal
from typing import Any

_requested = {"stop": False}


def record_early_stops() -> None:
    """From now until the trainer installs its handlers, remember SIGUSR1 / SIGTERM instead
    of dying by them."""

    def remember(signum: int, frame: Any) -> None:
        _requested["stop"] = True

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, remember)


def early_stop_requested() -> bool:
    return _requested["stop"]
