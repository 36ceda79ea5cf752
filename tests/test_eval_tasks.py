"""``eval.tasks``: harness tasks during training, logged at the eval steps beside the
validation loss; a resumed run neither recomputes nor loses them; and the harness's
reseeding does not change training."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from pretrain.config import ConfigError, load_config
from pretrain.hf.export import load_checkpoint
from pretrain.hf.lm_eval_adapter import SeqBoatLM, evaluate_tasks, task_metrics
from pretrain.monitor import read_metrics
from pretrain.train import Trainer
from tests.test_lm_eval import TASK, write_task

KEY = f"val/tasks/{TASK}/acc"


def config(run_dir: Path, tasks: Path | None, *overrides: str):
    with_tasks = [f"eval.tasks=[{TASK}]", f"eval.include_path={tasks}"] if tasks else []
    return load_config(
        None,
        [
            f"run.dir={run_dir}", "wandb.mode=disabled", "data.tokenizer.kind=byte",
            "data.shuffle_buffer=8", "model.layers=2", "model.width=32", "model.zdim=8",
            "model.hdim=32", "model.window=8", "model.dropout=0.1", "train.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=4",
            "train.log_interval=1", "train.eval_interval=2", "train.eval_samples=4",
            "checkpoint.interval=2", "optimizer.warmup_steps=2", "optimizer.decay=constant",
            *with_tasks, *overrides,
        ],
    )  # fmt: skip


def test_tasks_logged_at_eval_steps_and_kept_over_resume(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_task(tmp_path / "tasks")
    run_dir = tmp_path / "run"
    Trainer(config(run_dir, tasks), progress=False).train()
    Trainer(config(run_dir, tasks, "train.max_steps=6"), progress=False).train()  # resumes
    records = read_metrics(run_dir / "metrics.jsonl")
    logged = [(r["step"], r[KEY]) for r in records if KEY in r]
    assert [step for step, _ in logged] == [0, 2, 4, 6]  # each eval step once
    for r in records:
        if KEY in r:
            assert "val/loss" in r  # in the same record as the validation loss
    # The figure at step 6 is the harness on the step-6 checkpoint.
    lm = SeqBoatLM(trained=load_checkpoint(run_dir, 6))
    direct = task_metrics(evaluate_tasks(lm, [TASK], tasks))[f"{TASK}/acc"]
    assert logged[-1][1] == direct
    # Running the harness does not change training (it reseeds the generators; dropout
    # is on): the loss curve of a run without tasks is the same.
    plain = tmp_path / "plain"
    Trainer(config(plain, None, "train.max_steps=6"), progress=False).train()

    def losses(path: Path) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in read_metrics(path) if "train/loss" in r}

    assert losses(run_dir / "metrics.jsonl") == losses(plain / "metrics.jsonl")


def test_eval_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval\.include_path: no such folder"):
        config(tmp_path, tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"eval\.batch_size"):
        config(tmp_path, None, "eval.batch_size=0")


@pytest.mark.slow
def test_tasks_on_a_tensor_parallel_run_score_the_whole_model(tmp_path: Path, monkeypatch) -> None:
    """Tensor 2: rank 0 gathers the split model and scores it; the figure is the harness's
    on the saved checkpoint, loaded whole."""
    import os
    import subprocess
    import sys

    from testing.local import free_ports
    from testing.small_run import SMALL_RUN

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_task(tmp_path / "tasks")
    run_dir = tmp_path / "tp2"
    (port,) = free_ports(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "pretrain", "train",
        "--no-progress", f"run.dir={run_dir}", *SMALL_RUN, "parallel.tensor=2",
        "train.max_steps=2", "train.eval_interval=2", "checkpoint.interval=2",
        f"eval.tasks=[{TASK}]", f"eval.include_path={tasks}",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [(r["step"], r[KEY]) for r in read_metrics(run_dir / "metrics.jsonl") if KEY in r]
    assert [step for step, _ in logged] == [0, 2]
    lm = SeqBoatLM(trained=load_checkpoint(run_dir, 2))
    direct = task_metrics(evaluate_tasks(lm, [TASK], tasks))[f"{TASK}/acc"]
    assert logged[-1][1] == direct
