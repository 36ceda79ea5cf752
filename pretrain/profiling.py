"""``train.profile_steps: [start, end]``: a ``torch.profiler`` trace of those steps (1-based,
both included) on the ranks of ``train.profile_ranks``, written to
``<run_dir>/profile/rank_<N>_steps_<start>-<end>.json`` (Chrome trace format: chrome://tracing,
Perfetto, or TensorBoard's profiler plugin)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class ProfileWindow:
    def __init__(self, steps: list[int], ranks: list[int], rank: int, run_dir: Path) -> None:
        self.enabled = bool(steps) and rank in ranks
        self.start, self.end = (steps[0], steps[1]) if steps else (0, -1)
        self.path = (
            Path(run_dir) / "profile" / f"rank_{rank:05d}_steps_{self.start}-{self.end}.json"
        )
        self._profiler: profile | None = None

    def before_step(self, step: int) -> None:
        """``step``: the 1-based number of the step about to run."""
        if self.enabled and step == self.start:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities)
            self._profiler.__enter__()

    def after_step(self, step: int) -> None:
        if self._profiler is not None and step == self.end:
            self.close()

    def close(self) -> None:
        """Stops and writes the trace (also of a window cut short by the end of the run)."""
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.path))
        self._profiler = None
