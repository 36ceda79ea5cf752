"""Command-line parsing: overrides and options in any order, strays rejected; a stop signal
during start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.cli import parse_args
from testing.small_run import SMALL_RUN


def test_options_may_sit_between_overrides() -> None:
    args = parse_args(["train", "a.b=1", "--no-progress", "c=2", "--config", "x.yaml", "d=3"])
    assert args.no_progress and args.config == "x.yaml"
    assert args.overrides == ["a.b=1", "c=2", "d=3"]


@pytest.mark.parametrize(
    "argv",
    [["train", "a=1", "--bogus"], ["eval", "--run-dir", "x", "--nope"], ["plot", "run", "a=1"]],
)
def test_stray_arguments_are_rejected(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    mask = int(next(line.split()[1] for line in status if line.startswith("SigCgt")), 16)
    return bool(mask >> (sig - 1) & 1)


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_stop_signal_during_startup_saves_and_requeues(tmp_path: Path) -> None:
    """`seqboat train` remembers a SIGUSR1 from before torch is even imported (Slurm's
    --signal may come during minutes of start-up) and stops at its first step boundary with
    a checkpoint and the requeue code, instead of dying by the signal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", SEQBOAT_CACHE_DIR=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "pretrain", "train", "--no-progress", *SMALL_RUN,
         f"run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _catches(child.pid, signal.SIGUSR1):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        torch_loaded = _maps_torch(child.pid)
        child.send_signal(signal.SIGUSR1)
        _, err = child.communicate(timeout=300)
    finally:
        child.kill()
    assert not torch_loaded  # the handler came first
    assert child.returncode == 75, err[-2000:]
    assert "stopped on request at step 1; checkpoint saved" in err
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_model_parallel_sizes_need_enough_processes(tmp_path: Path) -> None:
    """A model split over more ranks than were launched is one clear error, not a silent
    single-process run; nothing is written."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "pretrain", "train", *SMALL_RUN, "parallel.pipeline=2",
         f"run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "SEQBOAT_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "seqboat: error: world size 1 is not a multiple of tensor x pipeline x context = "
        "1 x 2 x 1 = 2"
    )
    assert not run_dir.exists()
