"""Every log interval the ranks' step times are gathered: the logging rank reports min /
median / max and names the slowest rank and its host when it is a straggler."""

from __future__ import annotations

import contextlib
import io
import socket

from testing.local import run_ranks

STEP_S = [1.0, 1.1, 2.5]  # rank 2 is 2.27x the median
WAIT = [0.1, 0.0, 0.5]


def worker(rank: int, world: int, threshold: float) -> tuple[dict, str]:
    from parallel.dims import ParallelDims
    from parallel.world import World
    from pretrain.stragglers import StragglerReport
    from testing.local import gloo_world

    with gloo_world(rank, world):
        dims = ParallelDims(
            World(rank, world, rank, "127.0.0.1", 0, "torchrun"), dp_size=world, dp_rank=rank
        )
        report = StragglerReport(dims, threshold)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            out = report.gather(STEP_S[rank], WAIT[rank])
        return out, stderr.getvalue()


def test_spread_and_the_slowest_rank_named() -> None:
    results = run_ranks(worker, 3, 1.2, timeout=120)
    expected = {
        "perf/step_time_min_s": 1.0, "perf/step_time_median_s": 1.1,
        "perf/step_time_max_s": 2.5, "perf/data_wait_max_fraction": 0.5,
        "perf/slowest_rank": 2.0,
    }  # fmt: skip
    assert all(out == expected for out, _ in results)  # every rank: the same figures
    warning = results[0][1]
    assert f"rank 2 on {socket.gethostname()} is a straggler" in warning and "2.27x" in warning
    assert results[1][1] == results[2][1] == ""  # only the logging rank says it


def test_no_warning_below_the_threshold() -> None:
    results = run_ranks(worker, 3, 2.5, timeout=120)
    assert results[0][0]["perf/slowest_rank"] == 2.0 and results[0][1] == ""
