"""Stragglers: every log interval, each rank's mean step time and data wait are gathered, and
the logging rank reports their spread over the ranks and names the slowest rank and its host
when it is more than ``train.straggler_threshold`` times the median (Megatron's straggler
detector and Composer's callback do the same for their loops)."""

from __future__ import annotations

import socket
import statistics
import sys

import torch
import torch.distributed as dist

from parallel.dims import ParallelDims


class StragglerReport:
    def __init__(self, dims: ParallelDims, threshold: float) -> None:
        self.dims, self.threshold = dims, threshold
        self._hosts: list[str] | None = None

    def gather(self, step_s: float, data_wait: float) -> dict[str, float]:
        """Collective over all ranks (call at the same steps on every rank): this rank's
        mean step time and data-wait fraction over the log window in, the spread out."""
        if not self.dims.distributed:
            return {}
        mine = torch.tensor([step_s, data_wait], dtype=torch.float64, device=self.dims.device)
        parts = [torch.empty_like(mine) for _ in range(self.dims.world.world_size)]
        dist.all_gather(parts, mine)
        if self._hosts is None:  # once: hosts do not move
            hosts: list[str | None] = [None] * self.dims.world.world_size
            dist.all_gather_object(hosts, socket.gethostname())
            self._hosts = [str(h) for h in hosts]
        times = [float(p[0]) for p in parts]
        waits = [float(p[1]) for p in parts]
        median = statistics.median(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        out = {
            "perf/step_time_min_s": min(times),
            "perf/step_time_median_s": median,
            "perf/step_time_max_s": times[slowest],
            "perf/data_wait_max_fraction": max(waits),
            "perf/slowest_rank": float(slowest),
        }
        if median > 0 and times[slowest] > self.threshold * median and self.dims.is_main:
            print(
                f"seqboat: warning: rank {slowest} on {self._hosts[slowest]} is a straggler: "
                f"{times[slowest]:.3f} s per step, {times[slowest] / median:.2f}x the median "
                f"{median:.3f} s (data wait {waits[slowest]:.0%} of it)",
                file=sys.stderr,
            )
        return out
