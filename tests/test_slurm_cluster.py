"""On a real Slurm cluster (tests/slurm_cluster.py: slurmctld and two slurmd on this host,
one namespace per node): a 2-node x 2-task job trains the tiny config with TP=2 x DP=2 over
gloo, submitted with ``seqboat slurm submit`` as a user would. Once its first checkpoint
exists the job is told to stop (``scancel -b -s USR1``, what Slurm sends before a time
limit); it saves, exits 75, requeues itself, resumes and completes. Every logged loss of
the resumed run matches the same run under torchrun (to 1e-6 relative; so far they have
been equal), and ``seqboat slurm status`` reports the final step and the job.

Skipped, with the reason, where the machine cannot host the cluster (not root, no
``unshare``, no Slurm: .ci/run installs it when it runs as root).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from parallel.local import free_ports
from pretrain.monitor import read_metrics
from tests.conftest import SMALL_RUN
from tests.slurm_cluster import (
    FINISHED,
    SlurmCluster,
    die_with_parent,
    isolated,
    slurm_cluster,
    unavailable_reason,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
STEPS = 30  # SMALL_RUN's train.max_steps
RUN = [
    *SMALL_RUN,
    "checkpoint.interval=5",  # the stop signal goes out after the first: 25 steps to spare
    "parallel.tensor=2",  # x data 2 on 4 ranks
]


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no local Slurm cluster: {reason}")
    start = time.monotonic()
    with slurm_cluster(nodes=2, cpus_per_node=4) as c:
        print(f"\nslurm cluster up in {time.monotonic() - start:.1f} s")
        yield c


def _env(base: dict[str, str], tmp: Path) -> dict[str, str]:
    return {**base, "OMP_NUM_THREADS": "1", "SEQBOAT_CACHE_DIR": str(tmp / "cache")}


def seqboat(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "pretrain", *args], env=env, cwd=cwd,
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


@dataclass
class SlurmRun:
    job_id: str
    run_dir: Path
    work: Path  # where it was submitted from
    stopped_at: int  # the step of the checkpoint saved on request
    final: dict[str, str]  # scontrol show job, at the end
    log: str  # the job's output, both segments


def _job_log(work: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(work.glob("slurm-logs/*.out")))


def _latest_step(run_dir: Path) -> int | None:
    try:
        name = (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None
    return int(name.removeprefix("step_"))


@dataclass
class Reference:
    """The same run under torchrun, started in the background: it overlaps the Slurm job's
    idle time (scheduling, the requeue delay) instead of adding its own."""

    proc: subprocess.Popen
    run_dir: Path
    log: Path
    started: float  # time.time()

    def wait(self, timeout_s: float = 300) -> list[dict]:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun still running after {timeout_s} s")
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        metrics = self.run_dir / "metrics.jsonl"
        print(f"\ntorchrun reference: {metrics.stat().st_mtime - self.started:.1f} s")
        return read_metrics(metrics)


@pytest.fixture(scope="module")
def reference(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("torchrun")
    (port,) = free_ports(1)
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
    ]  # fmt: skip
    train = ["-m", "pretrain", "train", "--no-progress", "--config", CONFIG]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    log = tmp / "torchrun.log"
    with open(log, "wb") as out:
        # In its own PID namespace: killing unshare kills torchrun and its workers.
        proc = subprocess.Popen(
            isolated([*torchrun, *train, f"run.dir={tmp / 'run'}", *RUN]), cwd=tmp,
            env=_env(env, tmp), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        yield Reference(proc, tmp / "run", log, time.time())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def slurm_run(
    cluster: SlurmCluster, reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> SlurmRun:
    """The job: submitted, stopped with USR1 after its first checkpoint, finished."""
    work = tmp_path_factory.mktemp("slurm-work")
    run_dir = work / "run"
    (port,) = free_ports(1)  # rather than the job-id port: other tests may be training
    start = time.monotonic()
    out = seqboat(
        "slurm", "submit", "--config", CONFIG, "--nodes", "2", "--tasks-per-node", "2",
        "--job-name", "seqboat-test", "--python", sys.executable, "--env", f"MASTER_PORT={port}",
        f"run.dir={run_dir}", *RUN, env=_env(cluster.env, work), cwd=work,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    submitted = re.fullmatch(r"submitted job (\d+)\n", out.stdout)
    assert submitted, out.stdout
    job_id = submitted.group(1)

    def context() -> str:
        tail = "\n".join(_job_log(work).splitlines()[-40:])
        return f"job {job_id}: {cluster.job(job_id)}\n--- job log\n{tail}\n{cluster.logs()}"

    polls = iter(range(1_000_000))

    def first_checkpoint() -> int | None:
        step = _latest_step(run_dir)  # every 0.1 s: the signal should follow it closely
        check_job = step is None and next(polls) % 10 == 0  # the job's state every second
        if check_job and cluster.job(job_id).get("JobState") in FINISHED:
            pytest.fail("the job ended before its first checkpoint\n" + context())
        return step

    first = cluster.wait("the first checkpoint", first_checkpoint, 120, every_s=0.1)
    t_ckpt = time.monotonic()
    assert first < STEPS, f"checkpoint {first} exists already: too late to stop the run"
    cluster.run("scancel", "-b", "-s", "USR1", job_id)

    # The first segment ends; its batch script has requeued the job before exiting.
    def segment_over() -> dict[str, str] | None:
        fields = cluster.job(job_id)
        done = fields["JobState"] in FINISHED or fields.get("Restarts", "0") != "0"
        return fields if done else None

    fields = cluster.wait("the first segment to end", segment_over, 60)
    t_requeued = time.monotonic()
    assert fields["Restarts"] == "1", f"not requeued\n{context()}"
    final = cluster.wait_job(job_id, FINISHED, 120)
    t_end = time.monotonic()
    print(
        f"\nslurm job {job_id}: first checkpoint after {t_ckpt - start:.1f} s, requeued "
        f"{t_requeued - t_ckpt:.1f} s after the signal, completed {t_end - t_requeued:.1f} s "
        f"later ({t_end - start:.1f} s from submission)"
    )
    log = _job_log(work)
    assert final["JobState"] == "COMPLETED", context()
    stopped = re.search(r"stopped on request at step (\d+); checkpoint saved", log)
    assert stopped, context()
    return SlurmRun(job_id, run_dir, work, int(stopped.group(1)), final, log)


def test_nodes_are_separate_hosts(cluster: SlurmCluster) -> None:
    """srun places two tasks on each node; each node has its own hostname and sees the
    others through the private hosts file."""
    script = 'echo "$SLURM_PROCID $(hostname) $(getent hosts node1 | cut -d" " -f1)"'
    out = cluster.run("srun", "--nodes=2", "--ntasks-per-node=2", "bash", "-c", script)
    lines = sorted(out.stdout.split("\n")[:-1])
    assert lines == [
        "0 node1 127.0.1.1",
        "1 node1 127.0.1.1",
        "2 node2 127.0.1.1",
        "3 node2 127.0.1.1",
    ]


def test_preempted_job_saves_requeues_and_completes(slurm_run: SlurmRun) -> None:
    log, run = slurm_run.log, slurm_run
    # Segment 1: the signal reached the trainer, which saved and exited 75 on every rank;
    # the batch script requeued the job.
    assert f"seqboat: job {run.job_id}, restart 0, nodes node[1-2]" in log
    assert log.count(f"stopped on request at step {run.stopped_at}; checkpoint saved") == 4
    # Printed only when srun exited with REQUEUE_EXIT_CODE (75).
    lines = [x for x in log.splitlines() if x.startswith(("seqboat:", "srun:", "slurmstepd"))]
    assert "seqboat: checkpoint saved on request; continuing the run" in log, "\n".join(lines)
    assert f"seqboat: requeueing job {run.job_id}" in log
    assert "srun failed" not in log
    assert 5 <= run.stopped_at < STEPS
    # Segment 2: the same job, restarted, resumed from that checkpoint and finished.
    assert f"seqboat: job {run.job_id}, restart 1, nodes node[1-2]" in log
    assert f"resuming {run.run_dir} from step_{run.stopped_at:08d}" in log
    assert f"step {STEPS}: val loss" in log
    assert "seqboat: run finished" in log
    restarts = {r["step"]: r["run/restarts"] for r in read_metrics(run.run_dir / "metrics.jsonl")
                if "run/restarts" in r}  # fmt: skip
    assert restarts == {s: int(s > run.stopped_at) for s in range(1, STEPS + 1)}
    assert run.final["ExitCode"] == "0:0"
    assert run.final["Restarts"] == "1"
    ckpt = run.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == [f"rank_0000{r}.pt" for r in range(4)]


def test_losses_match_torchrun(slurm_run: SlurmRun, reference: Reference) -> None:
    """The resumed Slurm run and the uninterrupted torchrun run of the same config log the
    same losses at every step: same ranks, same reductions, exact resume."""
    ref_records = reference.wait()

    def curve(records: list[dict], key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in records if key in r}

    slurm_records = read_metrics(slurm_run.run_dir / "metrics.jsonl")
    slurm, ref = curve(slurm_records, "train/loss"), curve(ref_records, "train/loss")
    assert list(slurm) == list(ref) == list(range(1, STEPS + 1))
    worst = max(abs(slurm[s] - ref[s]) / ref[s] for s in ref)
    print(f"largest relative train-loss difference: {worst:.2e}")
    assert worst < 1e-6, {s: (slurm[s], ref[s]) for s in ref if slurm[s] != ref[s]}
    assert ref[STEPS] < ref[1] - 1.0  # and it learned
    val, val_ref = curve(slurm_records, "val/loss"), curve(ref_records, "val/loss")
    assert list(val) == list(val_ref) == [0, 15, 30]
    assert max(abs(val[s] - val_ref[s]) / val_ref[s] for s in val) < 1e-6


def test_status_reports_the_run(slurm_run: SlurmRun, cluster: SlurmCluster) -> None:
    out = seqboat("slurm", "status", str(slurm_run.run_dir), env=cluster.env, cwd=slurm_run.work)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == [
        f"run: {slurm_run.run_dir}",
        f"checkpoint: step_{STEPS:08d}",
        f"step: {STEPS}",
    ]
    assert re.fullmatch(r"wandb run id: [0-9a-z]+", lines[3]), lines[3]
    assert lines[4] == "slurm jobs:"
    assert re.fullmatch(
        rf"  {slurm_run.job_id}  COMPLETED  exit 0:0  restarts 1  run time \S+  "
        rf"{re.escape(str(slurm_run.work))}/slurm-logs/seqboat-test-\S+\.sbatch",
        lines[5],
    ), lines[5]
    assert len(lines) == 6
