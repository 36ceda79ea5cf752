"""A hung rank ends the run within ``train.timeout_s``, and the error names the collective.

Under torchrun (DP 2) rank 1 stops taking part after step 2 (``SEQBOAT_HANG_AT``: it sleeps
where rank 0 enters the step's stop agreement, an all-reduce). Rank 0 must fail within the
timeout plus a margin, with one ``seqboat: error:`` line naming the all_reduce, its ranks and
where it was called, and exit with the collective-timeout code that the Slurm script counts
as a failure (tests/test_slurm_cluster.py: such a job gives up after its failure budget).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.timeouts import EXIT_COLLECTIVE_TIMEOUT, collective_timeout
from pretrain.stop import HANG_ENV
from testing.local import free_ports, subprocess_env
from testing.small_run import SMALL_RUN

TIMEOUT_S = 10


def test_other_errors_are_not_collective_timeouts() -> None:
    try:
        raise RuntimeError("Timed out waiting for the data")  # not from torch.distributed
    except RuntimeError as e:
        assert collective_timeout(e) is None


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_naming_the_collective(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "pretrain", "train", "--no-progress", f"run.dir={tmp_path / 'run'}", *SMALL_RUN,
        f"train.timeout_s={TIMEOUT_S}",
    ]  # fmt: skip
    env = subprocess_env(**{HANG_ENV: "2:1"})
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        # Step 2 logged: from now on rank 1 hangs and rank 0 waits in the stop agreement.
        while '"step": 2' not in (metrics.read_text() if metrics.exists() else ""):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "step 2 never came"
            time.sleep(0.1)
        hung_at = time.monotonic()
        error_at = None
        while proc.poll() is None:
            if error_at is None and "seqboat: error:" in log_path.read_text():
                error_at = time.monotonic()
            assert time.monotonic() < hung_at + TIMEOUT_S + 90, "the run did not end"
            time.sleep(0.1)
        ended_at = time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log_path.read_text()
    errors = [line for line in text.splitlines() if line.startswith("seqboat: error:")]
    assert len(errors) == 1, text[-3000:]  # rank 0's; rank 1 is killed by torchrun
    assert re.match(
        r"seqboat: error: rank 0 on \S+: all_reduce over ranks \[0, 1\] timed out "
        r"\(train\.timeout_s\), called from \S*pretrain/stop\.py:\d+ in agreed; ",
        errors[0],
    ), errors[0]
    assert f"exitcode  : {EXIT_COLLECTIVE_TIMEOUT}" in text  # torchrun's report of rank 0
    assert proc.returncode != 0
    # Rank 0 gives up after the timeout; torchrun then stops the hung rank (SIGTERM, which
    # the trainer takes as a stop request, then SIGKILL after its grace period).
    assert error_at is not None
    waited, ended = error_at - hung_at, ended_at - hung_at
    print(f"\nerror {waited:.1f} s and end of the run {ended:.1f} s after the hang")
    assert TIMEOUT_S - 1 <= waited <= TIMEOUT_S + 15
    assert ended <= TIMEOUT_S + 60
