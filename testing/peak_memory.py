"""The peak resident memory a piece of code adds to this process (CPU), for tests and benches.

Linux keeps a process's high-water mark of resident memory (``VmHWM``); writing ``5`` to
``/proc/self/clear_refs`` resets it to the current size, so the peak of one block is
``VmHWM`` after it minus ``VmRSS`` before it. Where the reset is not allowed, the mark since
the process started is used (an upper bound: run the block early in a fresh process).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{key} not in {_STATUS} (peak memory needs Linux)")
    return int(match.group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakGrowth:
    """Filled in when the ``peak_growth`` block ends."""

    bytes: int = 0
    reset: bool = False  # False: measured against the process's lifetime peak


@contextmanager
def peak_growth() -> Iterator[PeakGrowth]:
    """``with peak_growth() as peak: ...``; then ``peak.bytes`` is the most resident memory
    the block held at once above what the process held when it began."""
    gc.collect()
    result = PeakGrowth(reset=_reset_peak())
    before = _status_kib("VmRSS")
    yield result
    result.bytes = max(0, _status_kib("VmHWM") - before) * 1024
