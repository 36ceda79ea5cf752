"""On a real Slurm cluster (testing/slurm_cluster.py: slurmctld and two slurmd on this host,
one namespace per node), jobs submitted with ``seqboat slurm submit`` as a user would:

* a 2-node x 2-task job trains the tiny config with TP=2 x DP=2 over gloo. Once its first
  checkpoint exists it is told to stop (``scancel -b -s USR1``, what Slurm sends before a
  time limit); it saves, exits 75, requeues itself, resumes and completes. Every logged loss
  of the resumed run matches the same run under torchrun (to 1e-6 relative; so far they
  have been equal), and ``seqboat slurm status`` reports the final step and the job;
* a 1-task job with a 2-minute time limit gets Slurm's own pre-timeout signal
  (``--signal=B:USR1@30``), saves, requeues itself, resumes and completes (its length is
  cut, in its config file, to a few steps past the step it saved: see TIMED_RUN). Its W&B
  run (offline) is one run id whose steps go on across the requeue without a gap or a
  repeat, and its losses equal an uninterrupted single-process run's;
* a job whose data is missing on the nodes fails at start-up every time: it is requeued
  until ``max_failures_without_progress`` failures and then ends, with the message, for
  good;
* a job with a hung rank (``SEQBOAT_HANG_AT``) fails ``train.timeout_s`` after the hang with
  the collective named, every attempt, and likewise stops being requeued;
* finished jobs stay finished (no requeue after success or after giving up).

The four jobs run side by side (the time-limit job waits a minute for its signal anyway).
Skipped, with the reason, where the machine cannot host the cluster (not root, no
``unshare``, no Slurm: .ci/run installs it when it runs as root).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from pretrain.monitor import read_metrics
from testing.local import free_ports
from testing.slurm_cluster import (
    FINISHED,
    SlurmCluster,
    die_with_parent,
    isolated,
    slurm_cluster,
    unavailable_reason,
)
from testing.small_run import SMALL_RUN

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
STEPS = 30  # SMALL_RUN's train.max_steps
RUN = [
    *SMALL_RUN,
    "checkpoint.interval=5",  # the stop signal goes out after the first: 25 steps to spare
    "checkpoint.async=true",  # the stop may come while a save is written in the background
    "parallel.tensor=2",  # x data 2 on 4 ranks
]
# The time-limit job: Slurm's minimum limit is a minute, and pretrain.slurm wants the limit
# 90 s above the grace period (the signal may come a minute early): 2 minutes, 30 s. The
# signal then comes 60-90 s after the start, at whatever step the machine has reached. So
# that the test takes as long as that and no longer, however fast the machine, the run's
# length is in its own config file (train.max_steps is not frozen on resume): unreachable
# at first, then cut to EXTRA_STEPS past the step saved at the signal, before the requeued
# job starts again. The learning rate is constant after warm-up: the length of the run does
# not change its losses, which an uninterrupted process then shows step by step.
TIME_LIMIT, GRACE_S = "2", 30
FAR_STEPS, EXTRA_STEPS = 100_000, 20
TIMED_RUN = [
    *(item for item in SMALL_RUN if not item.startswith("train.max_steps=")),
    "wandb.mode=offline",
    "optimizer.decay=constant",
    "train.eval_interval=100",
    "checkpoint.interval=100000",  # saves only when stopped, and at the end
]
MAX_FAILURES = 3
HANG_FAILURES, HANG_TIMEOUT_S = 2, 10
SETTLE_S = 20  # > cred_expire (10 s) + a scheduler pass (2 s): a requeue would show by then


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no local Slurm cluster: {reason}")
    start = time.monotonic()
    with slurm_cluster(nodes=2, cpus_per_node=4) as c:
        print(f"\nslurm cluster up in {time.monotonic() - start:.1f} s")
        yield c


def _env(base: dict[str, str], tmp: Path, wandb_mode: str | None = None) -> dict[str, str]:
    """The environment for a job or reference run: no W&B variables of the test process
    (e.g. a parent's service socket); W&B's own folders in ``tmp``."""
    env = {k: v for k, v in base.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", SEQBOAT_CACHE_DIR=str(tmp / "cache"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[name] = str(tmp / "wandb-home")
    if wandb_mode is not None:
        env["WANDB_MODE"] = wandb_mode
    return env


def seqboat(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "pretrain", *args], env=env, cwd=cwd,
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


def _submit(cluster: SlurmCluster, work: Path, *args: str, wandb_mode: str = "disabled") -> str:
    """``seqboat slurm submit`` from ``work``; the job id."""
    out = seqboat(
        "slurm", "submit", "--config", CONFIG, "--python", sys.executable, *args,
        env=_env(cluster.env, work, wandb_mode), cwd=work,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    submitted = re.fullmatch(r"submitted job (\d+)\n", out.stdout)
    assert submitted, out.stdout
    return submitted.group(1)


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


def _context(cluster: SlurmCluster, job_id: str, work: Path) -> str:
    """For failure messages: the job's state, its log's tail and the daemons' logs."""
    tail = "\n".join(_job_log(work).splitlines()[-40:])
    return f"job {job_id}: {cluster.job(job_id)}\n--- job log\n{tail}\n{cluster.logs()}"


def _latest_step(run_dir: Path) -> int | None:
    try:
        name = (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None
    return int(name.removeprefix("step_"))


def _curve(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


@dataclass
class Reference:
    """The same run without Slurm (torchrun, or one process), started in the background: it
    overlaps the Slurm job's idle time (scheduling, the requeue delay) instead of adding
    its own."""

    proc: subprocess.Popen
    run_dir: Path
    log: Path
    started: float  # time.time()

    def wait(self, timeout_s: float = 300) -> list[dict]:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"reference run still running after {timeout_s} s")
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        metrics = self.run_dir / "metrics.jsonl"
        print(f"\nreference run {self.run_dir}: {metrics.stat().st_mtime - self.started:.1f} s")
        return read_metrics(metrics)


def _start_reference(
    tmp: Path, launcher: list[str], overrides: list[str], config: str | Path = CONFIG
) -> Reference:
    train = ["-m", "pretrain", "train", "--no-progress", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    log = tmp / "reference.log"
    with open(log, "wb") as out:
        # In its own PID namespace: killing unshare kills the run and its workers.
        proc = subprocess.Popen(
            isolated([*launcher, *train, f"run.dir={tmp / 'run'}", *overrides]), cwd=tmp,
            env=_env(env, tmp, "disabled"), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
    return Reference(proc, tmp / "run", log, time.time())


def _stop(reference: Reference) -> None:
    if reference.proc.poll() is None:
        reference.proc.kill()
        reference.proc.wait()


@pytest.fixture(scope="module")
def reference(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory):
    """The 2 x 2 run under torchrun."""
    (port,) = free_ports(1)
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
    ]  # fmt: skip
    ref = _start_reference(tmp_path_factory.mktemp("torchrun"), torchrun, RUN)
    try:
        yield ref
    finally:
        _stop(ref)


# --------------------------------------------------------------------------- jobs alongside


@dataclass
class Submitted:
    job_id: str
    work: Path
    run_dir: Path
    submitted: float  # time.monotonic()


@dataclass
class TimedJob(Submitted):
    reference: Reference
    config: Path  # the job's own config file: train.max_steps only
    cut: dict  # "stop" (the step saved at the first signal), "max_steps", "at" (monotonic)
    watcher: threading.Thread


def _write_max_steps(path: Path, steps: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"train:\n  max_steps: {steps}\n")
    os.replace(tmp, path)  # a job starting now reads the old file or the new one


@pytest.fixture(scope="module")
def timed_job(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory):
    """1 task, ``--time=2 --signal=B:USR1@30``, W&B offline, with a single-process
    reference run of the same config in the background, and a watcher that cuts the run
    short once the first segment has saved and requeued the job."""
    work = tmp_path_factory.mktemp("slurm-timed")
    config = work / "timed.yaml"
    _write_max_steps(config, FAR_STEPS)
    ref_dir = tmp_path_factory.mktemp("single")
    _write_max_steps(ref_dir / "timed.yaml", FAR_STEPS)
    start = time.monotonic()
    out = seqboat(
        "slurm", "submit", "--config", str(config), "--python", sys.executable, "--nodes", "1",
        "--tasks-per-node", "1", "--time", TIME_LIMIT, "--signal-grace", str(GRACE_S),
        "--job-name", "seqboat-timed", "--env", "WANDB_MODE=offline", f"run.dir={work / 'run'}",
        *TIMED_RUN, env=_env(cluster.env, work, "offline"), cwd=work,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    job_id = re.fullmatch(r"submitted job (\d+)\n", out.stdout).group(1)
    ref = _start_reference(ref_dir, [sys.executable], TIMED_RUN, ref_dir / "timed.yaml")
    cut: dict = {}
    done = threading.Event()

    def watch() -> None:
        """Once the job has been requeued (its first segment saved and exited), and before
        the next segment starts (at least cred_expire = 10 s later): max_steps = the step
        saved + EXTRA_STEPS."""
        while not done.wait(0.25):
            try:
                fields = cluster.job(job_id)
            except Exception:  # the cluster is going down: the test reports it
                return
            if fields.get("Restarts", "0") != "0":
                stop = _latest_step(work / "run")
                if stop is not None:
                    _write_max_steps(config, stop + EXTRA_STEPS)
                    cut.update(stop=stop, max_steps=stop + EXTRA_STEPS, at=time.monotonic())
                return
            if fields.get("JobState") in FINISHED:
                return

    watcher = threading.Thread(target=watch, name="timed-job-watcher", daemon=True)
    watcher.start()
    try:
        yield TimedJob(job_id, work, work / "run", start, ref, config, cut, watcher)
    finally:
        done.set()
        watcher.join(timeout=10)
        _stop(ref)


@pytest.fixture(scope="module")
def crash_job(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Submitted:
    """1 task whose data files do not exist where it runs: the config is valid (submit
    loads it), the trainer fails at start-up, every time."""
    work = tmp_path_factory.mktemp("slurm-crash")
    missing = work / "not-mounted" / "*.txt"
    job_id = _submit(
        cluster, work, "--nodes", "1", "--tasks-per-node", "1", "--job-name", "seqboat-crash",
        "--max-failures", str(MAX_FAILURES), f"run.dir={work / 'run'}", *SMALL_RUN,
        f"data.sources=[{{path: '{missing}'}}]",
    )  # fmt: skip
    return Submitted(job_id, work, work / "run", time.monotonic())


@pytest.fixture(scope="module")
def hang_job(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Submitted:
    """2 tasks; rank 1 hangs after step 2 (``SEQBOAT_HANG_AT``), every attempt: rank 0 fails
    after train.timeout_s naming the collective, srun stops the hung rank."""
    work = tmp_path_factory.mktemp("slurm-hang")
    job_id = _submit(
        cluster, work, "--nodes", "1", "--tasks-per-node", "2", "--job-name", "seqboat-hang",
        "--max-failures", str(HANG_FAILURES), "--env", "SEQBOAT_HANG_AT=2:1",
        f"run.dir={work / 'run'}", *SMALL_RUN, f"train.timeout_s={HANG_TIMEOUT_S}",
    )  # fmt: skip
    return Submitted(job_id, work, work / "run", time.monotonic())


# --------------------------------------------------------------------------- the 2 x 2 job


@pytest.fixture(scope="module")
def slurm_run(
    cluster: SlurmCluster,
    timed_job: TimedJob,
    crash_job: Submitted,
    hang_job: Submitted,
    reference: Reference,
    tmp_path_factory: pytest.TempPathFactory,
) -> SlurmRun:
    """The job: submitted, stopped with USR1 after its first checkpoint, finished. (The
    time-limit and crash jobs are submitted first: they run alongside.)"""
    work = tmp_path_factory.mktemp("slurm-work")
    run_dir = work / "run"
    (port,) = free_ports(1)  # rather than the job-id port: other tests may be training
    start = time.monotonic()
    job_id = _submit(
        cluster, work, "--nodes", "2", "--tasks-per-node", "2", "--job-name", "seqboat-test",
        "--env", f"MASTER_PORT={port}", f"run.dir={run_dir}", *RUN,
    )  # fmt: skip

    def context() -> str:
        return _context(cluster, job_id, work)

    polls = iter(range(1_000_000))

    def first_checkpoint() -> int | None:
        step = _latest_step(run_dir)  # every 0.1 s: the signal should follow it closely
        check_job = step is None and next(polls) % 10 == 0  # the job's state every second
        if check_job and cluster.job(job_id).get("JobState") in FINISHED:
            pytest.fail("the job ended before its first checkpoint\n" + context())
        return step

    first = cluster.wait("the first checkpoint", first_checkpoint, 300, every_s=0.1)
    t_ckpt = time.monotonic()
    assert first < STEPS, f"checkpoint {first} exists already: too late to stop the run"
    cluster.run("scancel", "-b", "-s", "USR1", job_id)

    # The first segment ends; its batch script has requeued the job before exiting.
    def segment_over() -> dict[str, str] | None:
        fields = cluster.job(job_id)
        done = fields["JobState"] in FINISHED or fields.get("Restarts", "0") != "0"
        return fields if done else None

    fields = cluster.wait("the first segment to end", segment_over, 120)
    t_requeued = time.monotonic()
    assert fields["Restarts"] == "1", f"not requeued\n{context()}"
    final = cluster.wait_job(job_id, FINISHED, 300)
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
    restarts = _curve(read_metrics(run.run_dir / "metrics.jsonl"), "run/restarts")
    assert restarts == {s: int(s > run.stopped_at) for s in range(1, STEPS + 1)}
    assert run.final["ExitCode"] == "0:0"
    assert run.final["Restarts"] == "1"
    assert _latest_step(run.run_dir) == STEPS


def test_losses_match_torchrun(slurm_run: SlurmRun, reference: Reference) -> None:
    """The resumed Slurm run and the uninterrupted torchrun run of the same config log the
    same losses at every step: same ranks, same reductions, exact resume."""
    ref_records = reference.wait()
    slurm_records = read_metrics(slurm_run.run_dir / "metrics.jsonl")
    slurm, ref = _curve(slurm_records, "train/loss"), _curve(ref_records, "train/loss")
    assert list(slurm) == list(ref) == list(range(1, STEPS + 1))
    worst = max(abs(slurm[s] - ref[s]) / ref[s] for s in ref)
    print(f"largest relative train-loss difference: {worst:.2e}")
    assert worst < 1e-6, {s: (slurm[s], ref[s]) for s in ref if slurm[s] != ref[s]}
    assert ref[STEPS] < ref[1] - 1.0  # and it learned
    val, val_ref = _curve(slurm_records, "val/loss"), _curve(ref_records, "val/loss")
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


# --------------------------------------------------------------------------- time limit


@dataclass
class WandbSegment:
    """One offline W&B run folder: one segment of the run."""

    folder: Path
    run_id: str  # from the run record in the file
    steps: list[int]  # of the history rows, in file order
    losses: dict[int, float]  # train/loss by step
    exited: bool  # the file ends with W&B's exit record: the segment closed its run


def read_wandb_segment(folder: Path) -> WandbSegment:
    """Reads ``run-<id>.wandb`` in an offline run folder: W&B's record log (LevelDB log
    format: 32 KiB blocks of [crc32, length, type] + data chunks, after a 7-byte header)
    of protobuf ``Record`` messages, checked against their checksums."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = folder.glob("run-*.wandb")
    run_id, steps, losses, exited = "", [], {}, False
    for data in _leveldb_records(path.read_bytes(), path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            steps.append(record.history.step.num)
            for item in record.history.item:
                if item.key == "train/loss" or "/".join(item.nested_key) == "train/loss":
                    losses[record.history.step.num] = json.loads(item.value_json)
        elif kind == "exit":
            exited = True
    return WandbSegment(folder, run_id, steps, losses, exited)


def _leveldb_records(buf: bytes, path: Path):
    block, header = 32768, 7
    assert buf[:4] == b":W&B", f"{path}: not a W&B run file"
    i, parts = 7, []
    while i + header <= len(buf):
        left = block - i % block
        if left < header:  # the rest of a block too short for a header is padding
            i += left
            continue
        crc, length, kind = struct.unpack("<IHB", buf[i : i + header])
        if (crc, length, kind) == (0, 0, 0):
            i += left  # padding to the end of the block
            continue
        data = buf[i + header : i + header + length]
        assert len(data) == length, f"{path}: truncated record at byte {i}"
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad crc at {i}"
        i += header + length
        if kind == 1:  # full
            yield data
        elif kind == 2:  # first
            parts = [data]
        elif kind == 3:  # middle
            parts.append(data)
        elif kind == 4:  # last
            yield b"".join([*parts, data])


@dataclass
class TimedRun:
    job: TimedJob
    final: dict[str, str]
    log: str
    stops: list[int]  # steps saved on request, one per requeue
    steps: int  # the run's final length (max_steps once cut)


@pytest.fixture(scope="module")
def timed_run(cluster: SlurmCluster, timed_job: TimedJob) -> TimedRun:
    job = timed_job

    def finished() -> dict[str, str] | None:
        fields = cluster.job(job.job_id)
        if fields.get("JobState") in FINISHED:
            return fields
        if not job.watcher.is_alive() and not job.cut:  # it would run FAR_STEPS
            pytest.fail("requeued without a checkpoint\n" + _context(cluster, job.job_id, job.work))
        return None

    final = cluster.wait(f"job {job.job_id} to end", finished, 400, every_s=1)
    elapsed = time.monotonic() - job.submitted
    log = _job_log(job.work)
    context = _context(cluster, job.job_id, job.work)
    assert final["JobState"] == "COMPLETED", context
    assert job.cut, f"the run was not cut short after a first stop\n{context}"
    stops = [int(s) for s in re.findall(r"stopped on request at step (\d+); checkpoint", log)]
    print(
        f"\ntime-limit job {job.job_id}: stopped at step {stops} by the time-limit signal, "
        f"requeued, cut to {job.cut['max_steps']} steps "
        f"{job.cut['at'] - job.submitted:.1f} s after submission, completed after {elapsed:.1f} s"
    )
    return TimedRun(job, final, log, stops, job.cut["max_steps"])


def test_time_limit_signal_saves_requeues_and_completes(timed_run: TimedRun) -> None:
    """Slurm's own warning before the time limit (no scancel): the trainer saves, the
    script requeues the job, the next segment resumes from that checkpoint; the job ends
    COMPLETED, never TIMEOUT."""
    run, log, job_id = timed_run, timed_run.log, timed_run.job.job_id
    restarts = int(run.final["Restarts"])
    assert run.final["TimeLimit"] == "00:02:00"
    assert run.final["ExitCode"] == "0:0"
    assert restarts >= 1, log
    assert len(run.stops) == restarts, log  # every segment but the last stopped on request
    assert run.stops[0] == run.job.cut["stop"]
    assert run.stops == sorted(set(run.stops)) and run.stops[-1] < run.steps
    assert "srun failed" not in log
    assert log.count("seqboat: checkpoint saved on request; continuing the run") == restarts
    assert log.count(f"seqboat: requeueing job {job_id}") == restarts
    for segment, stop in enumerate(run.stops, start=1):
        assert f"seqboat: job {job_id}, restart {segment}, nodes node" in log
        assert f"resuming {run.job.run_dir} from step_{stop:08d}" in log
    assert f"step {run.steps}: val loss" in log
    assert log.count("seqboat: run finished") == 1
    assert _latest_step(run.job.run_dir) == run.steps
    assert not list(run.job.work.glob("slurm-logs/*.failures"))  # removed on success
    # metrics.jsonl: one record of each step, the restart count going up at each stop.
    counts = _curve(read_metrics(run.job.run_dir / "metrics.jsonl"), "run/restarts")
    assert list(counts) == list(range(1, run.steps + 1))
    assert counts == {s: sum(s > stop for stop in run.stops) for s in counts}


def test_time_limit_run_is_one_wandb_run(timed_run: TimedRun, cluster: SlurmCluster) -> None:
    """One offline W&B folder per segment, all with the checkpoint's run id; their history
    steps, in order, are 0..max_steps once each (each segment starts right after the step
    the previous one saved), and their losses are metrics.jsonl's."""
    run_dir = timed_run.job.run_dir
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))  # named by start time
    assert len(folders) == len(timed_run.stops) + 1, folders
    segments = [read_wandb_segment(f) for f in folders]
    out = seqboat("slurm", "status", str(run_dir), env=cluster.env, cwd=timed_run.job.work)
    assert out.returncode == 0, out.stderr
    (run_id,) = re.findall(r"^wandb run id: (\S+)$", out.stdout, flags=re.M)
    assert {s.run_id for s in segments} == {run_id}
    assert all(f.name.endswith(f"-{run_id}") for f in folders)
    assert all(s.exited for s in segments)  # every segment closed its run
    steps = [step for s in segments for step in s.steps]
    assert steps == list(range(timed_run.steps + 1))  # strictly increasing, no gap, no repeat
    for segment, stop in zip(segments, timed_run.stops, strict=False):
        assert segment.steps[-1] == stop
    losses = {k: v for s in segments for k, v in s.losses.items()}
    assert losses == _curve(read_metrics(run_dir / "metrics.jsonl"), "train/loss")


def test_time_limit_run_losses_match_one_process(timed_run: TimedRun) -> None:
    """Across the requeues the loss goes on exactly as in one uninterrupted process (which
    is stopped once it has passed the job's last step)."""
    ref = timed_run.job.reference
    metrics = ref.run_dir / "metrics.jsonl"

    def ref_steps() -> int:
        steps = [r["step"] for r in read_metrics(metrics) if "train/loss" in r]
        return steps[-1] if steps else 0

    deadline = time.monotonic() + 300
    while ref_steps() < timed_run.steps and ref.proc.poll() is None:
        assert time.monotonic() < deadline, f"the reference is at step {ref_steps()}"
        time.sleep(0.5)
    _stop(ref)
    ref_records = read_metrics(metrics)
    records = read_metrics(timed_run.job.run_dir / "metrics.jsonl")
    ours, theirs = _curve(records, "train/loss"), _curve(ref_records, "train/loss")
    assert list(ours) == list(range(1, timed_run.steps + 1))
    assert set(ours) <= set(theirs), ref.log.read_text()[-3000:]
    worst = max(abs(ours[s] - theirs[s]) / theirs[s] for s in ours)
    print(f"largest relative train-loss difference: {worst:.2e}")
    assert worst < 1e-6, {s: (ours[s], theirs[s]) for s in ours if ours[s] != theirs[s]}
    val, val_ref = _curve(records, "val/loss"), _curve(ref_records, "val/loss")
    common = sorted(set(val) & set(val_ref))
    assert common == list(range(0, timed_run.steps, 100))
    assert all(abs(val[s] - val_ref[s]) <= 1e-6 * val_ref[s] for s in common)


# --------------------------------------------------------------------------- crash loop


def test_crash_loop_stops_requeueing(cluster: SlurmCluster, crash_job: Submitted) -> None:
    """Failures at start-up with no checkpoint: requeued MAX_FAILURES - 1 times, then the
    job fails with the message and stays failed."""
    job = crash_job
    final = cluster.wait_job(job.job_id, FINISHED, 300, every_s=1)
    log = _job_log(job.work)
    context = _context(cluster, job.job_id, job.work)
    assert final["JobState"] == "FAILED", context
    assert final["Restarts"] == str(MAX_FAILURES - 1), context
    assert final["ExitCode"] == "2:0", context  # the trainer's exit status for a bad input
    assert log.count("matches no files") == MAX_FAILURES, context  # the cause, each time
    for attempt in range(1, MAX_FAILURES):
        assert f"srun failed (exit 2): failure {attempt} of {MAX_FAILURES} without progress" in log
    assert (
        f"seqboat: error: srun failed (exit 2) {MAX_FAILURES} times in a row with no new "
        f"checkpoint in {job.run_dir} (max_failures_without_progress={MAX_FAILURES}); "
        "giving up. Fix the cause and submit again." in log
    ), context
    assert log.count(f"seqboat: requeueing job {job.job_id}") == MAX_FAILURES - 1
    assert _latest_step(job.run_dir) is None
    _assert_stays(cluster, job.job_id, final)


def test_a_hung_rank_fails_the_job_without_a_requeue_loop(
    cluster: SlurmCluster, hang_job: Submitted
) -> None:
    """Each attempt ends train.timeout_s after the hang with the collective named and the
    collective-timeout exit code; the job is requeued HANG_FAILURES - 1 times, then fails for
    good."""
    job = hang_job
    final = cluster.wait_job(job.job_id, FINISHED, 400, every_s=1)
    log = _job_log(job.work)
    context = _context(cluster, job.job_id, job.work)
    assert final["JobState"] == "FAILED", context
    assert final["Restarts"] == str(HANG_FAILURES - 1), context
    # srun reports the worst task: the hung rank, killed once rank 0 exited with
    # EXIT_COLLECTIVE_TIMEOUT (--kill-on-bad-exit). Either is a failure, never the requeue code.
    assert final["ExitCode"] not in ("0:0", "75:0"), context
    named = re.findall(
        r"seqboat: error: rank 0 on node\S*: all_reduce over ranks \[0, 1\] timed out", log
    )
    assert len(named) == HANG_FAILURES, context
    assert "giving up" in log, context
    _assert_stays(cluster, job.job_id, final)


def _assert_stays(cluster: SlurmCluster, job_id: str, final: dict[str, str]) -> None:
    """The job is still in its final state SETTLE_S after it ended: not requeued."""
    ended = time.time() - _age_s(final.get("EndTime", ""))
    time.sleep(max(0.0, ended + SETTLE_S - time.time()))
    now = cluster.job(job_id)
    assert (now["JobState"], now["Restarts"]) == (final["JobState"], final["Restarts"]), now
    assert job_id not in cluster.jobs()


def _age_s(end_time: str) -> float:
    """Seconds since ``EndTime`` (scontrol's local time, e.g. 2026-11-23T04:26:33); 0 if
    unknown (then the full SETTLE_S is waited)."""
    try:
        return max(0.0, time.time() - time.mktime(time.strptime(end_time, "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return 0.0


def test_finished_jobs_stay_finished(
    cluster: SlurmCluster, slurm_run: SlurmRun, timed_run: TimedRun
) -> None:
    """A completed job is not requeued: the batch script exits 0 and requeues nothing."""
    _assert_stays(cluster, slurm_run.job_id, slurm_run.final)
    _assert_stays(cluster, timed_run.job.job_id, timed_run.final)
    assert not list(slurm_run.work.glob("slurm-logs/*.failures"))
