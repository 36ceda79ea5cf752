"""Slurm batch scripts: golden renders, validation, shell-injection safety, and the
requeue / failure / signal logic, run for real in bash against fake srun, scontrol and
sbatch (no Slurm needed).

Regenerate the golden files after an intended change:
``SEQBOAT_UPDATE_GOLDEN=1 python -m pytest tests/test_slurm_render.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pretrain.slurm import (
    REQUEUE_EXIT_CODE,
    SlurmError,
    SlurmJob,
    failures_file,
    parse_env,
    render,
    status,
    submit,
    time_limit_seconds,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "slurm" / "examples"
JOB_ID = "1234"

# The worked examples in slurm/examples: rendered with the run directory of their config.
GOLDEN = {
    "cpu-tiny-2nodes.sbatch": SlurmJob(
        config="configs/tiny.yaml",
        overrides=["parallel.tensor=2", "train.max_steps=1000"],
        nodes=2,
        tasks_per_node=2,
        cpus_per_task=2,
        mem="8G",
        time="00:30:00",
        partition="cpu",
        job_name="seqboat-tiny-cpu",
        requeue=False,  # the follow-up-job path: each segment submits the next
        env={"WANDB_MODE": "disabled"},
    ),
    "gpu-350m-16nodes.sbatch": SlurmJob(
        config="configs/350m.yaml",
        nodes=16,
        gpus_per_node=8,
        cpus_per_task=12,
        mem="0",  # all of each node's memory
        time="2-00:00:00",
        partition="gpu",
        account="llm",
        qos="high",
        constraint="h100&ib",
        exclusive=True,
        job_name="seqboat-350m",
        signal_grace_s=300,
        env={"NCCL_DEBUG": "WARN", "WANDB_MODE": "online"},
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # config paths (and so run directories) are relative to it
    text = render(GOLDEN[name])
    path = EXAMPLES / name
    if os.environ.get("SEQBOAT_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"rendering changed: SEQBOAT_UPDATE_GOLDEN=1 rewrites {path}"


def test_requeue_code_matches_trainer() -> None:
    from pretrain.train import REQUEUE_EXIT_CODE as TRAINER_CODE

    assert REQUEUE_EXIT_CODE == TRAINER_CODE


def test_sbatch_options() -> None:
    cpu = render(SlurmJob(), "runs/tiny")
    assert "#SBATCH --ntasks-per-node=1\n" in cpu
    assert "--gpus-per-node" not in cpu and "--exclusive" not in cpu
    assert "export OMP_NUM_THREADS=1\n" in cpu and "WANDB_MODE" not in cpu
    gpu = render(SlurmJob(nodes=2, gpus_per_node=4, array="0-9%1", dependency="afterok:7"), "r")
    for option in (
        "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--array=0-9%1",
        "--dependency=afterok:7", "--output=slurm-logs/%x-%j.out", "--open-mode=append",
        "--requeue", "--signal=B:USR1@120",
    ):  # fmt: skip
        assert f"#SBATCH {option}\n" in gpu
    assert "#SBATCH --no-requeue\n" in render(SlurmJob(requeue=False), "r")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partition", "gpu; reboot"),
        ("partition", "gpu\n#SBATCH --uid=0"),
        ("account", "a b"),
        ("qos", "q$(id)"),
        ("job_name", "name\n"),
        ("job_name", "a/b"),
        ("constraint", "a100; id"),
        ("time", "1:00:00; id"),
        ("time", "01:00:00\n"),
        ("time", "forever"),
        ("time", "0"),
        ("time", "00:03:00"),  # closer to the 120 s grace than Slurm's early signal
        ("mem", "64GB"),
        ("mem", "64G\nid"),
        ("array", "1-3;id"),
        ("array", "1-3\n"),
        ("dependency", "afterok:1 && id"),
        ("dependency", "afterok:"),
        ("dependency", "before:1"),
        ("output_dir", "logs dir"),
        ("output_dir", "logs/%j"),
        ("env", {"A B": "x"}),
        ("env", {"SLURM_NTASKS": "1"}),
        ("env", {"WANDB_MODE": "online; id"}),
        ("env", {"X": "a\0b"}),
        ("nodes", 0),
        ("nodes", True),
        ("gpus_per_node", -1),
        ("cpus_per_task", 0),
        ("signal_grace_s", 0),
        ("signal_grace_s", 70000),
        ("max_failures_without_progress", 0),
        ("overrides", ["a=\0"]),
        ("overrides", "a=1"),
        ("config", ""),
        ("requeue", "yes"),
    ],
)
def test_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SlurmJob\.{field}"):
        SlurmJob(**{field: value})  # type: ignore[arg-type]


def test_rejected_combinations() -> None:
    with pytest.raises(ValueError, match="tasks_per_node"):
        SlurmJob(gpus_per_node=8, tasks_per_node=4)
    with pytest.raises(ValueError, match="array"):
        SlurmJob(array="0-3%1", requeue=False)
    job = SlurmJob()
    job.partition = "x;reboot"  # changed after construction: render checks again
    with pytest.raises(ValueError, match="partition"):
        render(job, "r")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partition", "gpu,gpu-long"),
        ("constraint", "[rack1|rack2]&ib"),
        ("array", "1,3,5-11:2%2"),
        ("dependency", "afterok:12:13_4,afterany:9"),
        ("dependency", "after:5+10?afternotok:6"),
        ("dependency", "singleton"),
        ("mem", "512000M"),
        ("time", "2-12"),
    ],
)
def test_accepted(field: str, value: object) -> None:
    SlurmJob(**{field: value})  # type: ignore[arg-type]


def test_time_limit_seconds() -> None:
    forms = {"90": 5400, "1:30": 90, "01:00:00": 3600, "2-03": 183600, "2-03:04": 183840}
    forms["1-00:00:05"] = 86405
    assert {t: time_limit_seconds(t) for t in forms} == forms


def test_parse_env() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_env(["A"])


# --------------------------------------------------------------------------- fake Slurm

FAKE_SRUN = """#!{python} -S
import json, os, signal, sys, time

log = os.environ["FAKE_LOG"]
with open(os.path.join(log, "srun.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_SRUN_WAIT"):
    def on_signal(signum, frame):
        with open(os.path.join(log, "srun.signals"), "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
        sys.exit({code})
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    open(os.path.join(log, "srun.started"), "w").close()
    time.sleep(20)
    sys.exit(1)
sys.exit(int(os.environ.get("FAKE_SRUN_EXIT", "0")))
"""

FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >>"$FAKE_LOG/calls"
if [[ -n ${FAKE_SCONTROL_FAIL:-} ]]; then echo "scontrol: error: Access denied" >&2; exit 1; fi
if [[ $1 == show ]]; then
  [[ $4 == 101 ]] || { echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }
  # Abridged from Slurm 22.05.8.
  echo "JobId=101 JobName=A UserId=root(0) JobState=FAILED Reason=NonZeroExitCode" \\
    "Dependency=(null) Requeue=1 Restarts=2 BatchFlag=1 ExitCode=1:0 RunTime=01:02:03"
fi
"""

FAKE_SBATCH = """#!/bin/bash
echo "sbatch $*" >>"$FAKE_LOG/calls"
if [[ -n ${FAKE_SBATCH_FAIL:-} ]]; then echo "sbatch: error: invalid partition" >&2; exit 1; fi
echo "4242;cluster"
"""


@dataclass
class Fakes:
    work: Path  # the job's working directory
    bin: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "HOME": str(self.work / "home"),  # so an injected `rm -rf ~` would hit a canary
            "SLURM_JOB_ID": JOB_ID,
            "FAKE_LOG": str(self.log),
            **extra,
        }

    def calls(self) -> list[str]:
        path = self.log / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def srun_argvs(self) -> list[list[str]]:
        path = self.log / "srun.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def write_script(self, job: SlurmJob, run_dir: str = "run") -> Path:
        script = self.work / "job.sbatch"
        script.write_text(render(job, run_dir))
        return script

    def run(self, script: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(script)], cwd=self.work, env=self.env(**env),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    f = Fakes(work=tmp_path / "work", bin=tmp_path / "bin", log=tmp_path / "log")
    for d in (f.work / "home", f.bin, f.log):
        d.mkdir(parents=True)
    (f.work / "home" / "canary").write_text("still here")
    code = REQUEUE_EXIT_CODE
    for name, text in [
        ("srun", FAKE_SRUN.format(python=sys.executable, code=code)),
        ("scontrol", FAKE_SCONTROL),
        ("sbatch", FAKE_SBATCH),
    ]:
        (f.bin / name).write_text(text)
        (f.bin / name).chmod(0o755)
    return f


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


# --------------------------------------------------------------------------- injection


def test_hostile_strings_reach_srun_verbatim(fakes: Fakes) -> None:
    pwned = fakes.work / "pwned"
    overrides = [
        f'run.name=x"; touch {pwned}; echo "',
        f"$(touch {pwned})",
        f"`touch {pwned}`",
        f"a=1\ntouch {pwned}",
        f"b=1; touch {pwned} #",
        f"c='; touch {pwned}; '",
        "-rf",
        "${HOME}",
        "*",
        "d=\\",
    ]
    config = ";rm -rf ~"
    job = SlurmJob(config=config, overrides=overrides, env={"X": f"$(touch {pwned})"})
    script = fakes.write_script(job, run_dir=f"runs/$(touch {pwned})")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    before = _files(fakes.work)

    result = fakes.run(script)

    assert result.returncode == 0, result.stderr
    (argv,) = fakes.srun_argvs()
    srun_opts = ["--kill-on-bad-exit=1", "--nodes=1", "--ntasks-per-node=1"]
    train = ["python", "-m", "pretrain", "train", "--no-progress", f"--config={config}", "--"]
    assert argv == [*srun_opts, *train, *overrides]
    assert not pwned.exists()
    assert (fakes.work / "home" / "canary").read_text() == "still here"
    assert _files(fakes.work) == before
    assert fakes.calls() == []


# --------------------------------------------------------------------------- exit codes


def test_success_ends_the_run(fakes: Fakes) -> None:
    result = fakes.run(fakes.write_script(SlurmJob()), FAKE_SRUN_EXIT="0")
    assert result.returncode == 0
    assert "run finished" in result.stdout
    assert fakes.calls() == []


def test_requeue_code_requeues(fakes: Fakes) -> None:
    result = fakes.run(fakes.write_script(SlurmJob()), FAKE_SRUN_EXIT=str(REQUEUE_EXIT_CODE))
    assert result.returncode == 0  # the segment handed over as planned
    assert fakes.calls() == [f"scontrol requeue {JOB_ID}"]


def test_failed_requeue_is_reported(fakes: Fakes) -> None:
    script = fakes.write_script(SlurmJob())
    result = fakes.run(script, FAKE_SRUN_EXIT=str(REQUEUE_EXIT_CODE), FAKE_SCONTROL_FAIL="1")
    assert result.returncode == REQUEUE_EXIT_CODE
    assert "could not continue the run" in result.stderr


def test_requeue_code_without_requeue_submits_a_follow_up(fakes: Fakes) -> None:
    (fakes.work / "run").mkdir()
    script = fakes.write_script(SlurmJob(requeue=False))
    result = fakes.run(script, FAKE_SRUN_EXIT=str(REQUEUE_EXIT_CODE))
    assert result.returncode == 0
    assert fakes.calls() == [f"sbatch --parsable --dependency=afterany:{JOB_ID} {script}"]
    assert (fakes.work / "run" / "slurm_jobs.txt").read_text() == f"4242\tfollow-up of {JOB_ID}\n"


def test_failures_without_progress_give_up(fakes: Fakes) -> None:
    script = fakes.write_script(SlurmJob(max_failures_without_progress=3))
    for attempt in (1, 2):
        result = fakes.run(script, FAKE_SRUN_EXIT="1")
        assert result.returncode == 1
        assert f"failure {attempt} of 3" in result.stdout
        assert fakes.calls() == [f"scontrol requeue {JOB_ID}"] * attempt
    result = fakes.run(script, FAKE_SRUN_EXIT="1")
    assert result.returncode == 1
    assert "3 times in a row" in result.stderr and "giving up" in result.stderr
    assert len(fakes.calls()) == 2  # no third requeue


def test_progress_resets_the_failure_count(fakes: Fakes) -> None:
    latest = fakes.work / "run" / "checkpoints" / "latest"
    latest.parent.mkdir(parents=True)
    latest.write_text("step_00000100\n")
    script = fakes.write_script(SlurmJob(max_failures_without_progress=2))
    assert "failure 1 of 2" in fakes.run(script, FAKE_SRUN_EXIT="1").stdout
    latest.write_text("step_00000200\n")  # the requeued attempt saved a checkpoint, then failed
    result = fakes.run(script, FAKE_SRUN_EXIT="1")
    assert "failure 1 of 2" in result.stdout
    assert fakes.calls() == [f"scontrol requeue {JOB_ID}"] * 2
    assert "giving up" in fakes.run(script, FAKE_SRUN_EXIT="1").stderr  # no progress since


def test_failure_without_requeue_submits_a_follow_up(fakes: Fakes) -> None:
    script = fakes.write_script(SlurmJob(requeue=False))
    assert fakes.run(script, FAKE_SRUN_EXIT="3").returncode == 3
    assert fakes.calls() == [f"sbatch --parsable --dependency=afterany:{JOB_ID} {script}"]


# --------------------------------------------------------------------------- signals


def _wait_for(path: Path, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_reaches_srun_as_usr1(fakes: Fakes, sig: signal.Signals) -> None:
    """USR1 (the time-limit warning) and TERM both reach srun as USR1; after USR1 the job
    is requeued, after TERM (scancel, preemption) it is not."""
    proc = subprocess.Popen(
        ["bash", str(fakes.write_script(SlurmJob()))], cwd=fakes.work,
        env=fakes.env(FAKE_SRUN_WAIT="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,  # one process group: killed as one below
    )  # fmt: skip
    try:
        _wait_for(fakes.log / "srun.started")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (fakes.log / "srun.signals").read_text() == "SIGUSR1\n"
    if sig == signal.SIGUSR1:
        assert proc.returncode == 0, err
        assert fakes.calls() == [f"scontrol requeue {JOB_ID}"]
    else:
        assert proc.returncode == REQUEUE_EXIT_CODE, err
        assert fakes.calls() == []
        assert "stopped by SIGTERM" in err


# --------------------------------------------------------------------------- submit


def test_submit(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(fakes.work)
    monkeypatch.setenv("FAKE_LOG", str(fakes.log))
    run_dir = fakes.work / "runs" / "r"
    job = SlurmJob(overrides=[f"run.dir={run_dir}"], output_dir="logs")
    stale = Path(failures_file(job, run_dir))
    stale.parent.mkdir()
    stale.write_text("2\nstep_1\n")  # left by an earlier chain of the same run

    job_id = submit(job, sbatch=str(fakes.bin / "sbatch"))

    assert job_id == "4242"
    (script,) = (fakes.work / "logs").glob("seqboat-*.sbatch")
    assert script.read_text() == render(job, run_dir)
    assert fakes.calls() == [f"sbatch --parsable {script.relative_to(fakes.work)}"]
    assert (run_dir / "slurm_jobs.txt").read_text() == f"4242\t{script.resolve()}\n"
    assert not stale.exists()


def test_submit_errors(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    from pretrain.config import ConfigError

    monkeypatch.chdir(fakes.work)
    monkeypatch.setenv("FAKE_LOG", str(fakes.log))
    sbatch = str(fakes.bin / "sbatch")
    with pytest.raises(SlurmError, match="not found on PATH"):
        submit(SlurmJob(), sbatch=str(fakes.work / "no-sbatch"))
    with pytest.raises(ConfigError, match=r"model\.widht"):
        submit(SlurmJob(overrides=["model.widht=8"]), sbatch=sbatch)
    # A split that does not fit the allocation: 2 x 2 tasks for tensor 2 x pipeline 4.
    split = ["parallel.tensor=2", "parallel.pipeline=4"]
    with pytest.raises(SlurmError, match=r"2 node\(s\) x 2 task\(s\): world size 4 is not"):
        submit(SlurmJob(overrides=split, nodes=2, tasks_per_node=2), sbatch=sbatch)
    with pytest.raises(SlurmError, match=r"global_batch_size \(16\) must be a multiple"):
        submit(SlurmJob(nodes=3, tasks_per_node=1), sbatch=sbatch)  # data-parallel 3
    assert fakes.calls() == []  # a bad config never reaches the queue
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    with pytest.raises(SlurmError, match=r"exit 1.*invalid partition"):
        submit(SlurmJob(), sbatch=sbatch)


# --------------------------------------------------------------------------- status


def test_status(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    run_dir = fakes.work / "run"
    ckpt = run_dir / "checkpoints" / "step_00000200"
    ckpt.mkdir(parents=True)
    torch.save({"train": {"step": 200, "run_id": "abc123"}}, ckpt / "rank_00000.pt")
    (ckpt / "meta.json").write_text(json.dumps({"format": 1, "step": 200, "world_size": 1}))
    (run_dir / "checkpoints" / "latest").write_text("step_00000200\n")
    (run_dir / "slurm_jobs.txt").write_text("101\t/x/a.sbatch\n102\tfollow-up of 101\n")
    monkeypatch.setenv("FAKE_LOG", str(fakes.log))

    report = status(run_dir, scontrol=str(fakes.bin / "scontrol"))

    assert report.splitlines() == [
        f"run: {run_dir}",
        "checkpoint: step_00000200",
        "step: 200",
        "wandb run id: abc123",
        "slurm jobs:",
        "  101  FAILED (NonZeroExitCode)  exit 1:0  restarts 2  run time 01:02:03  /x/a.sbatch",
        "  102  state unknown: slurm_load_jobs error: Invalid job id specified  follow-up of 101",
    ]
    without = status(run_dir, scontrol=str(fakes.work / "no-scontrol"))
    assert "  101  state unknown: no scontrol  /x/a.sbatch" in without.splitlines()


def test_status_of_a_new_run(tmp_path: Path) -> None:
    report = status(tmp_path)
    assert "checkpoint: none yet" in report and "wandb run id: unknown" in report
    assert "none recorded" in report
