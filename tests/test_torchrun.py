"""`torchrun --nproc_per_node 4 -m pretrain train parallel.tensor=2 ...` (tensor 2 x data 2,
context 2 x tensor 2, interleaved pipeline 2 x data 2; gloo) follows the single-process loss
curve of the same config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.monitor import read_metrics
from testing.local import free_ports
from testing.small_run import SMALL_RUN

RUN = ["--no-progress", *SMALL_RUN, "checkpoint.interval=15"]
ZERO2_CP2_TP2_SP = [
    "parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true",
    "optimizer.zero_stage=2",
]  # fmt: skip


def train(tmp_path: Path, name: str, launcher: list[str], *extra: str) -> list[dict]:
    run_dir = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQBOAT_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [*launcher, "-m", "pretrain", "train", f"run.dir={run_dir}", *RUN, *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("val loss") == 1  # one report, from rank 0
    if "resuming" in out.stderr and "elastic" in str(run_dir):
        assert "resharded (tensor x context x pipeline x data 1x1x2x2 -> 1x1x1x1)" in out.stderr
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("split", "model"),
    [
        (["parallel.tensor=2", "parallel.sequence_parallel=true"], []),  # TP 2 (+SP) x DP 2
        (["parallel.context=2", "parallel.tensor=2"], []),  # CP 2 x TP 2
        # Interleaved 1F1B: PP 2 x 2 virtual stages (one layer each) x DP 2.
        (["parallel.pipeline=2", "parallel.virtual_stages=2"], ["model.layers=4"]),
        # ZeRO-2 sharded over the context ranks; partial and sequence-parallel gradients
        # are summed by hooks before DeepSpeed reduces them.
        (ZERO2_CP2_TP2_SP, []),
        (["parallel.context=2"], []),  # CP 2 x DP 2: layer statistics over all four ranks
    ],
    ids=["tp2-sp-dp2", "cp2-tp2", "pp2-vp2-dp2", "cp2-tp2-sp-zero2", "cp2-dp2"],
)
def test_parallel_run_matches_one_process(
    tmp_path: Path, split: list[str], model: list[str]
) -> None:
    single = train(tmp_path, "single", [sys.executable], *model)
    (port,) = free_ports(1)
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
    ]  # fmt: skip
    parallel = train(tmp_path, "parallel", torchrun, *split, *model)
    ckpt = tmp_path / "parallel" / "checkpoints" / "step_00000030"
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == [f"rank_0000{r}.pt" for r in range(4)]

    def curve(records: list[dict], key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in records if key in r}

    a, b = curve(single, "train/loss"), curve(parallel, "train/loss")
    assert list(a) == list(b) == list(range(1, 31))
    # Step 1: same weights, same batch: float32 equality. Later steps: the curves stay
    # together (reduction order differs, Adam carries the difference along).
    assert abs(a[1] - b[1]) / a[1] < 1e-5
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 1e-4
    assert a[30] < a[1] - 1.0  # and it learned
    # Adam hardly notices a wrong clipping norm in the loss: compare the norm itself.
    na, nb = curve(single, "train/grad_norm"), curve(parallel, "train/grad_norm")
    assert max(abs(na[s] - nb[s]) / na[s] for s in na) < 1e-4
    va, vb = curve(single, "val/loss"), curve(parallel, "val/loss")
    assert list(va) == list(vb) == [0, 15, 30]
    assert max(abs(va[s] - vb[s]) / va[s] for s in va) < 1e-4
    if "parallel.pipeline=2" in split:  # layer statistics gathered from the stages
        ra, rb = curve(single, "layer_3/act_ratio"), curve(parallel, "layer_3/act_ratio")
        assert list(ra) == list(rb) == list(range(1, 31))
        assert ra[1] == rb[1]
    if split == ["parallel.context=2"]:  # the run's statistics: data and context ranks summed
        for key in ("layer_0/act_ratio", "layer_1/act_ratio", "layer_1/attn_span"):
            ra, rb = curve(single, key), curve(parallel, key)
            assert list(ra) == list(rb) == list(range(1, 31))
            assert ra[1] == pytest.approx(rb[1], rel=1e-12), key


@pytest.mark.slow
def test_resume_on_another_layout(tmp_path: Path) -> None:
    """10 steps on pipeline 2 x data 2, then 10 more on 1 process, follow 20 straight steps
    on 1 process: the data order is global, and the checkpoint (model and Adam state, keyed
    by global layer) reshards to one process."""
    constant = ["optimizer.decay=constant", "optimizer.warmup_steps=0", "checkpoint.interval=10"]
    straight = train(tmp_path, "straight", [sys.executable], "train.max_steps=20", *constant)
    (port,) = free_ports(1)
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
    ]  # fmt: skip
    train(tmp_path, "elastic", torchrun, "train.max_steps=10", "parallel.pipeline=2", *constant)
    resumed = train(tmp_path, "elastic", [sys.executable], "train.max_steps=20", *constant)

    def curve(records: list[dict]) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}

    a, b = curve(straight), curve(resumed)
    assert list(a) == list(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 1e-4


def _torchrun(nproc: int) -> list[str]:
    (port,) = free_ports(1)
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
    ]  # fmt: skip


def _losses(records: list[dict], key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.slow
def test_pipeline_zero1_resume_is_bitwise(tmp_path: Path) -> None:
    """Pipeline 2 x data 2 with DeepSpeed ZeRO-1: 8 straight steps, and 4 + resume + 4,
    give the same losses bit for bit; both follow one process without ZeRO (float32), and
    so does the gradient norm (the last stage's tied embedding copy counted once)."""
    common = ["optimizer.decay=constant", "checkpoint.interval=4", "train.max_steps=8"]
    split = ["parallel.pipeline=2", "optimizer.zero_stage=1", *common]
    single_records = train(tmp_path, "single", [sys.executable], *common)
    straight_records = train(tmp_path, "straight", _torchrun(4), *split)
    single, straight = _losses(single_records), _losses(straight_records)
    norm, norm_zero = (_losses(r, "train/grad_norm") for r in (single_records, straight_records))
    assert max(abs(norm[s] - norm_zero[s]) / norm[s] for s in norm) < 1e-5
    train(tmp_path, "resumed", _torchrun(4), *split[:-1], "train.max_steps=4")
    assert (tmp_path / "resumed/checkpoints/step_00000004/deepspeed/zero").is_dir()
    resumed = _losses(train(tmp_path, "resumed", _torchrun(4), *split))
    assert list(straight) == list(resumed) == list(range(1, 9))
    assert straight == resumed
    assert max(abs(single[s] - straight[s]) / single[s] for s in single) < 1e-5


@pytest.mark.slow
def test_zero2_resumes_on_one_process(tmp_path: Path) -> None:
    """ZeRO-2 on 2 data-parallel ranks for 4 steps, then 4 more on one process (DeepSpeed's
    universal checkpoint reshards the optimizer state): the losses follow 8 straight steps
    on one process without ZeRO (float32)."""
    common = ["optimizer.decay=constant", "checkpoint.interval=4"]
    single = _losses(train(tmp_path, "single", [sys.executable], *common, "train.max_steps=8"))
    zero = [*common, "optimizer.zero_stage=2"]
    train(tmp_path, "zero", _torchrun(2), *zero, "train.max_steps=4")
    resumed = _losses(train(tmp_path, "zero", [sys.executable], *zero, "train.max_steps=8"))
    assert list(resumed) == list(single) == list(range(1, 9))
    assert max(abs(single[s] - resumed[s]) / single[s] for s in single) < 1e-5


@pytest.mark.slow
def test_zero3_run_resumes_and_refuses_another_size(tmp_path: Path) -> None:
    """ZeRO-3 on 2 ranks (parameters partitioned; checkpoints gather them whole): 4 steps,
    then 4 more after a resume, follow one process without ZeRO; resuming on one process is
    refused with one clear error line (DeepSpeed cannot reshard ZeRO-3 state)."""
    # Wide enough that DeepSpeed partitions the GAU projections (it keeps parameters under
    # 1e5 elements whole on every rank): 256 x 512.
    common = [
        "optimizer.decay=constant", "checkpoint.interval=4", "model.width=256", "model.hdim=512",
    ]  # fmt: skip
    single = _losses(train(tmp_path, "single", [sys.executable], *common, "train.max_steps=8"))
    zero = [*common, "optimizer.zero_stage=3"]
    train(tmp_path, "zero", _torchrun(2), *zero, "train.max_steps=4")
    resumed = _losses(train(tmp_path, "zero", _torchrun(2), *zero, "train.max_steps=8"))
    assert list(resumed) == list(single) == list(range(1, 9))
    assert max(abs(single[s] - resumed[s]) / single[s] for s in single) < 1e-5
    out = subprocess.run(
        [sys.executable, "-m", "pretrain", "train", f"run.dir={tmp_path / 'zero'}", *RUN, *zero,
         "train.max_steps=12"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SEQBOAT_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert out.returncode == 2
    assert "seqboat: error: ZeRO-3: loading a checkpoint of data-parallel size 2 on 1" in out.stderr
    # The checkpoint's model files hold the whole parameters (gathered for the save):
    # `seqboat eval` loads them into one process and gets the run's validation loss.
    out = subprocess.run(
        [sys.executable, "-m", "pretrain", "eval", "--run-dir", str(tmp_path / "zero")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SEQBOAT_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    val = _losses(read_metrics(tmp_path / "zero" / "metrics.jsonl"), "val/loss")
    assert f"step 8: val loss {val[8]:.4f}" in out.stdout, out.stdout
