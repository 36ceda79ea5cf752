"""`seqboat` as a user runs it: train on real text, kill -9, resume, eval, generate, plot."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.monitor import read_metrics
from tests.conftest import CORPUS

SMALL_RUN = [
    "model.layers=2",
    "model.width=64",
    "model.zdim=16",
    "model.hdim=128",
    "model.window=32",
    "data.tokenizer.vocab_size=1024",
    "data.tokenizer.train_bytes=2000000",
    "train.seq_length=128",
    "train.micro_batch_size=8",
    "train.global_batch_size=16",
    "train.max_steps=120",
    "train.log_interval=5",
    "train.eval_interval=40",
    "train.eval_samples=16",
    "optimizer.warmup_steps=10",
    "checkpoint.interval=20",
]


def seqboat(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # Not the W&B variables of this process: an in-process W&B run (another test) leaves
    # its service's address behind, which a child would try to reach.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {
        **inherited,
        "WANDB_MODE": "offline",
        "SEQBOAT_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "2",
    }


@pytest.mark.slow
def test_train_kill_resume_eval_generate_plot(tmp_path: Path, env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    sources = f"data.sources=[{{path: ['{CORPUS}/moby_dick.txt', '{CORPUS}/shakespeare.txt']}}]"
    args = [
        "train", "--no-progress", f"run.dir={run_dir}", sources,
        f"data.tokenizer.path={tmp_path / 'tok.model'}", *SMALL_RUN,
    ]  # fmt: skip

    # Kill -9 once a checkpoint past the first has been published: no chance to clean up.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretrain", *args],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text().strip() >= "step_00000040":
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]

    # The same command resumes and finishes.
    done = seqboat(*args, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    match = re.search(r"step 120: val loss ([\d.]+) .* bpb ([\d.]+)", done.stdout)
    assert match, done.stdout
    assert "sample:" in done.stdout

    records = read_metrics(run_dir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(5, 121, 5))  # one continuous curve, no repeats, no gaps
    assert killed_at >= 40
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    assert sorted(val) == [0, 40, 80, 120]
    assert val[120] < val[0] - 1.5, val  # learned well past the unigram level
    assert float(match.group(1)) == pytest.approx(val[120], abs=1e-3)
    assert all(0 < r["layer_0/act_ratio"] <= 1 for r in records if "layer_0/act_ratio" in r)

    # Two W&B process starts, one offline run id.
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({p.name.rsplit("-", 1)[1] for p in offline}) == 1

    ev = seqboat("eval", "--run-dir", str(run_dir), env=env, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert float(re.search(r"val loss ([\d.]+)", ev.stdout).group(1)) == pytest.approx(
        val[120], abs=1e-3
    )
    gen = seqboat(
        "generate", "--run-dir", str(run_dir), "--prompt", "Call me", "--max-new-tokens", "20",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert gen.returncode == 0 and gen.stdout.startswith("Call me"), gen.stderr
    plot = seqboat("plot", str(run_dir), env=env, cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    for name in ("loss.png", "activation.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.widht=64"], "unknown key model.widht (did you mean model.width?)"),
        (["train.seq_length=abc"], "train.seq_length: expected int, got 'abc'"),
        (["model.window=512", "train.seq_length=256"], "model.window (512) must not exceed"),
        (["--config", "nope.yaml"], "config file not found: nope.yaml"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    tmp_path: Path, env: dict[str, str], args: list[str], message: str
) -> None:
    out = seqboat("train", f"run.dir={tmp_path / 'run'}", *args, env=env, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqboat: error: ") and message in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
