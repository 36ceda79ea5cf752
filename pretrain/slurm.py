"""Slurm batch scripts for a training run: render, submit, and report on them.

``render`` turns a ``SlurmJob`` into an sbatch script that starts one ``python -m pretrain
train`` task per GPU with ``srun`` (ranks find each other from srun's variables, see
``parallel.world``; no torchrun) and keeps the run going across time limits and crashes:

* ``--signal=B:USR1@<grace>`` reaches the batch shell only; the shell forwards it to the
  step, the trainer finishes its step, saves and exits with ``REQUEUE_EXIT_CODE``, and the
  shell requeues the job (or, with ``requeue=False``, submits a copy of itself that starts
  after this job);
* any other failure is retried the same way until ``max_failures_without_progress`` failures
  in a row left the run's ``checkpoints/latest`` pointer where it was.

Every user value is either checked against Slurm's syntax (what goes into ``#SBATCH``
lines) or shell-quoted (what goes into commands): config paths and overrides are arbitrary
strings and reach the trainer as single, verbatim arguments.

Over 400 lines on purpose: render, submit and status share one job model (``SlurmJob``, its
validation and the rendered shell text), which is read as a whole when a job misbehaves.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# pretrain.train's exit code for "checkpoint saved on request, requeue me". Repeated rather
# than imported: pretrain.train pulls in torch and megatron-core, and rendering stays
# instant. tests/test_slurm_render.py keeps the two equal.
REQUEUE_EXIT_CODE = 75

# --signal=USR1@N may come up to ~60 s early (slurmctld checks every ~30 s, measured on
# Slurm 22.05): a time limit closer than this to the grace period could signal at start.
SIGNAL_SLACK_S = 90

JOBS_FILE = "slurm_jobs.txt"  # in the run directory: "<job id>\t<script or note>" per line

# Patterns are matched with re.fullmatch: "$" would let a trailing newline through, and a
# newline in an #SBATCH value would end the comment and start a shell command.
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PARTITIONS = re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*")  # sbatch takes a list
_CONSTRAINT = re.compile(r"[A-Za-z0-9._:&|*()\[\]-]+")  # features with & | [] * ()
_MEM = re.compile(r"[0-9]+[KMGT]?")
_TIME = re.compile(
    r"(?P<days>[0-9]+)-(?P<dh>[0-9]+)(:(?P<dm>[0-9]+)(:(?P<ds>[0-9]+))?)?"
    r"|(?P<a>[0-9]+)(:(?P<b>[0-9]+)(:(?P<c>[0-9]+))?)?"
)
_ARRAY_ITEM = r"[0-9]+(-[0-9]+(:[0-9]+)?)?"
_ARRAY = re.compile(rf"{_ARRAY_ITEM}(,{_ARRAY_ITEM})*(%[0-9]+)?")
_JOB_REF = r"[0-9]+(_[0-9]+)?"
_DEPENDENCY_ITEM = (
    rf"after(:{_JOB_REF}(\+[0-9]+)?)+"
    rf"|(afterany|afterburstbuffer|aftercorr|afternotok|afterok)(:{_JOB_REF})+"
    r"|singleton"
)
_DEPENDENCY = re.compile(rf"({_DEPENDENCY_ITEM})([,?]({_DEPENDENCY_ITEM}))*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# No '%' (sbatch expands %j, %x... in --output) and no whitespace (one #SBATCH word).
_OUTPUT_DIR = re.compile(r"[A-Za-z0-9._/+-]+")
_WANDB_MODES = ("online", "offline", "disabled", "dryrun")


class SlurmError(RuntimeError):
    """sbatch or scontrol is missing or failed; the message says which and why."""


@dataclass
class SlurmJob:
    """What the user asks for. ``validate()`` (run on construction and by ``render``) raises
    ``ValueError`` naming the field for anything Slurm would reject or that is unsafe."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU-only job
    tasks_per_node: int | None = None  # default: one per GPU, or 1 on CPU
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, e.g. "64G"; "0" is all of it
    time: str = "01:00:00"  # minutes, [D-]HH:MM:SS and Slurm's other forms
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str = "seqboat"
    output_dir: str = "slurm-logs"
    array: str | None = None
    dependency: str | None = None
    signal_grace_s: int = 120
    requeue: bool = True
    max_failures_without_progress: int = 3
    env: dict[str, str] = field(default_factory=dict)
    python: str = "python"  # the interpreter on the compute nodes

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    def validate(self) -> None:
        self._validate_launch()
        self._validate_resources()
        self._validate_scheduling()
        self._validate_environment()

    def _validate_launch(self) -> None:
        if self.config is not None:
            _check_arg("config", self.config)
        if not isinstance(self.overrides, list):
            raise ValueError(f"SlurmJob.overrides: expected a list, got {self.overrides!r}")
        for i, item in enumerate(self.overrides):
            _check_arg(f"overrides[{i}]", item)
        _check_arg("python", self.python)

    def _validate_resources(self) -> None:
        _check_int("nodes", self.nodes, minimum=1)
        _check_int("gpus_per_node", self.gpus_per_node, minimum=0)
        if self.tasks_per_node is not None:
            _check_int("tasks_per_node", self.tasks_per_node, minimum=1)
            # Each task drives cuda:<local rank> and sees every GPU of its node.
            if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
                raise ValueError(
                    f"SlurmJob.tasks_per_node ({self.tasks_per_node}) must equal "
                    f"gpus_per_node ({self.gpus_per_node}): one task per GPU"
                )
        if self.cpus_per_task is not None:
            _check_int("cpus_per_task", self.cpus_per_task, minimum=1)
        if self.mem is not None:
            _check_pattern("mem", self.mem, _MEM, "a number with an optional K, M, G or T")
        _check_bool("exclusive", self.exclusive)

    def _validate_scheduling(self) -> None:
        seconds = time_limit_seconds(self.time)
        _check_int("signal_grace_s", self.signal_grace_s, minimum=1, maximum=65535)
        if seconds < self.signal_grace_s + SIGNAL_SLACK_S:
            raise ValueError(
                f"SlurmJob.time ({self.time}) must exceed signal_grace_s "
                f"({self.signal_grace_s} s) by at least {SIGNAL_SLACK_S} s: Slurm may send "
                "the signal up to a minute early"
            )
        _check_pattern("job_name", self.job_name, _NAME, "letters, digits, '.', '_', '-'")
        for name in ("account", "qos"):
            value = getattr(self, name)
            if value is not None:
                _check_pattern(name, value, _NAME, "letters, digits, '.', '_', '-'")
        if self.partition is not None:
            _check_pattern("partition", self.partition, _PARTITIONS, "names separated by ','")
        if self.constraint is not None:
            _check_pattern("constraint", self.constraint, _CONSTRAINT, "Slurm feature syntax")
        if self.array is not None:
            _check_pattern("array", self.array, _ARRAY, "e.g. 0-15, 1,3,5-7, 0-9%1")
        if self.dependency is not None:
            _check_pattern("dependency", self.dependency, _DEPENDENCY, "e.g. afterok:123")
        _check_pattern("output_dir", self.output_dir, _OUTPUT_DIR, "a path without spaces or %")
        _check_bool("requeue", self.requeue)
        _check_int("max_failures_without_progress", self.max_failures_without_progress, 1)
        if self.array is not None and not self.requeue:
            raise ValueError(
                "SlurmJob.array needs requeue=True: a follow-up submission of the script "
                "would start the whole array again"
            )

    def _validate_environment(self) -> None:
        if not isinstance(self.env, dict):
            raise ValueError(f"SlurmJob.env: expected a mapping, got {self.env!r}")
        for key, value in self.env.items():
            if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
                raise ValueError(f"SlurmJob.env: {key!r} is not a valid variable name")
            if key.startswith("SLURM_"):
                raise ValueError(
                    f"SlurmJob.env: {key} is Slurm's to set (srun reads SLURM_* as options)"
                )
            _check_arg(f"env[{key}]", value)
        mode = self.env.get("WANDB_MODE")
        if mode is not None and mode not in _WANDB_MODES:
            raise ValueError(f"SlurmJob.env[WANDB_MODE]: {mode!r} is not one of {_WANDB_MODES}")


def _check_arg(name: str, value: object) -> None:
    """Any string can be quoted for the shell; a NUL cannot be in an argument at all."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"SlurmJob.{name}: expected a non-empty string without NUL")


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)  # True is an int too
    if not is_int or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"SlurmJob.{name}: expected an integer {bound}, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"SlurmJob.{name}: expected true or false, got {value!r}")


def _check_pattern(name: str, value: object, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"SlurmJob.{name}: {value!r} is not valid ({what})")


def time_limit_seconds(value: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"SlurmJob.time: {value!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)"
        )
    part = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in part:
        seconds = ((part["days"] * 24 + part["dh"]) * 60 + part.get("dm", 0)) * 60
        seconds += part.get("ds", 0)
    elif "c" in part:  # H:M:S
        seconds = (part["a"] * 60 + part["b"]) * 60 + part["c"]
    else:  # M or M:S
        seconds = part["a"] * 60 + part.get("b", 0)
    if seconds <= 0:
        raise ValueError(f"SlurmJob.time: {value!r} must be positive")
    return seconds


def parse_env(items: list[str]) -> dict[str, str]:
    """``["KEY=value", ...]`` (e.g. repeated ``--env`` options) as a mapping; the value may
    hold '=' and anything else. Keys are checked by ``SlurmJob``."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


# --------------------------------------------------------------------------- rendering


def run_dir_of(job: SlurmJob) -> Path:
    """The run directory the job trains into. Loads (and so validates) the config, also
    against the job's task count: a typo in an override or a split that does not fit the
    allocation fails here rather than after hours in the queue."""
    from parallel.topology import ParallelSizes  # with the config: imports torch
    from pretrain.config import ConfigError, load_config, micro_batches_per_step

    cfg = load_config(job.config, job.overrides)
    p = cfg.parallel
    world = job.nodes * job.ntasks_per_node
    try:
        data = ParallelSizes(tensor=p.tensor, pipeline=p.pipeline, context=p.context).data(world)
    except ValueError as e:
        raise SlurmError(f"{job.nodes} node(s) x {job.ntasks_per_node} task(s): {e}") from None
    try:
        micro_batches_per_step(cfg, data)
    except ConfigError as e:
        raise SlurmError(f"{e} ({job.nodes} node(s) x {job.ntasks_per_node} task(s))") from None
    return cfg.run_dir


def failures_file(job: SlurmJob, run_dir: Path | str) -> str:
    """Where the script counts failures without progress: one file per run directory, so
    follow-up jobs share it and two runs in one output folder do not."""
    text = str(run_dir)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[-60:] or "run"
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{job.output_dir}/{slug}.{digest}.failures"


def render(job: SlurmJob, run_dir: Path | str | None = None) -> str:
    """The sbatch script for ``job``. ``run_dir`` defaults to the config's (see
    ``run_dir_of``); the script watches ``<run_dir>/checkpoints/latest`` for progress."""
    job.validate()  # again: fields may have been changed since construction
    run_dir = run_dir_of(job) if run_dir is None else run_dir
    parts = [
        "#!/bin/bash",
        "# Rendered by pretrain/slurm.py (`seqboat slurm submit`): change the job there,",
        "# not here. Submit from the directory the paths below are relative to.",
        *(f"#SBATCH {option}" for option in sbatch_options(job)),
        "",
        "set -u  # not -e: every exit status below is looked at",
        ': "${SLURM_JOB_ID:?run this script with sbatch}"',
        "",
        *_settings(job, run_dir),
        "",
        _LOGIC,
    ]
    return "\n".join(parts)


def sbatch_options(job: SlurmJob) -> list[str]:
    """The ``#SBATCH`` options; values are validated to need no quoting."""
    opts = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.ntasks_per_node}",
    ]
    if job.gpus_per_node:
        opts.append(f"--gpus-per-node={job.gpus_per_node}")
    optional = {
        "cpus-per-task": job.cpus_per_task,
        "mem": job.mem,
        "time": job.time,
        "partition": job.partition,
        "account": job.account,
        "qos": job.qos,
        "constraint": job.constraint,
        "array": job.array,
        "dependency": job.dependency,
    }
    opts += [f"--{name}={value}" for name, value in optional.items() if value is not None]
    if job.exclusive:
        opts.append("--exclusive")
    opts += [
        f"--output={job.output_dir}/%x-%j.out",
        "--open-mode=append",  # a requeued job writes on into the same log
        "--requeue" if job.requeue else "--no-requeue",
        f"--signal=B:USR1@{job.signal_grace_s}",
    ]
    return opts


def _settings(job: SlurmJob, run_dir: Path | str) -> list[str]:
    """Shell assignments of everything job-specific; the logic below only reads them."""
    q = shlex.quote
    train = [job.python, "-m", "pretrain", "train", "--no-progress"]
    if job.config is not None:
        train.append(f"--config={job.config}")  # '=': a path starting with '-' stays a value
    train.append("--")  # overrides are positional even if one starts with '-'
    srun = ["--kill-on-bad-exit=1", f"--nodes={job.nodes}"]
    srun.append(f"--ntasks-per-node={job.ntasks_per_node}")
    if job.cpus_per_task is not None:
        # Slurm 22.05's srun does not inherit sbatch's --cpus-per-task.
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    lines = [
        f"run_dir={q(str(run_dir))}",
        f"failures_file={q(failures_file(job, run_dir))}",
        f"requeue={int(job.requeue)}",
        f"max_failures={job.max_failures_without_progress}",
        f"requeue_code={REQUEUE_EXIT_CODE}",
        f"srun_args=({' '.join(map(q, srun))})",
        "train=(",
        f"  {' '.join(map(q, train))}",
        *(f"  {q(item)}" for item in job.overrides),
        ")",
    ]
    if "OMP_NUM_THREADS" not in job.env:
        # torch would start one thread per core in every task of the node.
        lines.append(f"export OMP_NUM_THREADS={job.cpus_per_task or 1}")
    lines += [f"export {key}={value}" for key, value in NCCL_FLIGHT_RECORDER.items()]
    lines += [f"export {key}={q(value)}" for key, value in job.env.items()]  # these win
    return lines


# PyTorch's NCCL flight recorder: every rank keeps a ring of its last collectives, and when
# one times out (train.timeout_s) each dumps it (which collective, over which ranks, how far
# it got) to <run_dir>/nccl-trace/rank_<N> (the trainer creates the folder); torch's
# `torchfrtrace <run_dir>/nccl-trace` names the rank that never joined. Gloo runs print the
# same in the error line (parallel/timeouts.py).
NCCL_FLIGHT_RECORDER = {
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": '"$run_dir/nccl-trace/rank_"',
}


# The job-independent part of the script: reads only the variables set above.
_LOGIC = r"""
# Slurm sends --signal=B:USR1 to this shell only. srun runs in the background because bash
# defers a trap until the foreground command ends, while `wait` returns as soon as a trapped
# signal arrives. Both USR1 and TERM go on to srun as USR1: srun answers a TERM by
# SIGKILLing its tasks, which would lose the checkpoint the trainer is about to write.
srun_pid=
stop_signal=
forward_stop() {
  [[ $stop_signal == TERM ]] || stop_signal=$1
  if [[ -n $srun_pid ]]; then kill -USR1 "$srun_pid" 2>/dev/null; fi
  return 0
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

# Requeue this job, or submit this script again to start when this job ends.
continue_run() {
  if ((requeue)); then
    echo "seqboat: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && return 0
  else
    local next
    if next=$(sbatch --parsable --dependency="afterany:$SLURM_JOB_ID" "$0"); then
      next=${next%%;*}
      echo "seqboat: submitted job $next to continue after $SLURM_JOB_ID"
      if [[ -d $run_dir ]]; then
        printf '%s\t%s\n' "$next" "follow-up of $SLURM_JOB_ID" >>"$run_dir/slurm_jobs.txt"
      fi
      return 0
    fi
  fi
  echo "seqboat: error: could not continue the run; resubmit the job" >&2
  return 1
}

# Consecutive failures that left checkpoints/latest unchanged; a new checkpoint since the
# last failure starts the count again. File: the count, then the pointer it was taken at.
count_failure() {
  local latest='' seen=''
  failures=0
  if [[ -f $run_dir/checkpoints/latest ]]; then read -r latest <"$run_dir/checkpoints/latest"; fi
  if [[ -f $failures_file ]]; then { read -r failures; read -r seen; } <"$failures_file"; fi
  [[ $failures =~ ^[0-9]+$ && $latest == "$seen" ]] || failures=0
  failures=$((failures + 1))
  mkdir -p "$(dirname "$failures_file")"
  printf '%s\n%s\n' "$failures" "$latest" >"$failures_file"
}

echo "seqboat: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST:-?}"
srun "${srun_args[@]}" "${train[@]}" &
srun_pid=$!
if [[ -n $stop_signal ]]; then kill -USR1 "$srun_pid" 2>/dev/null; fi  # came before $!
wait "$srun_pid"
status=$?
# A trapped signal also ends `wait` (status 128 + signal): wait on until srun has exited.
while ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid"
  status=$?
done

if ((status == 0)); then
  echo "seqboat: run finished"
  rm -f "$failures_file"
  exit 0
fi
if [[ $stop_signal == TERM ]]; then
  # scancel, preemption or node shutdown: Slurm ends or requeues the job itself, and a
  # requeue from here would undo a scancel.
  echo "seqboat: stopped by SIGTERM (srun exit $status); not continuing" >&2
  exit "$status"
fi
if ((status == requeue_code)); then
  # Handed over as planned: this segment succeeded (0), unless the hand-over failed.
  echo "seqboat: checkpoint saved on request; continuing the run"
  continue_run && exit 0
  exit "$status"
fi
count_failure
if ((failures >= max_failures)); then
  echo "seqboat: error: srun failed (exit $status) $failures times in a row with no new" \
    "checkpoint in $run_dir (max_failures_without_progress=$max_failures); giving up." \
    "Fix the cause and submit again." >&2
  exit "$status"
fi
echo "seqboat: srun failed (exit $status): failure $failures of $max_failures without progress"
continue_run
exit "$status"
""".removeprefix("\n")


# --------------------------------------------------------------------------- submitting


def submit(job: SlurmJob, sbatch: str = "sbatch") -> str:
    """Render ``job`` into a new script under ``job.output_dir``, submit it with
    ``sbatch --parsable`` and return the job id. The config is loaded first (``ConfigError``
    on a bad one); the run's failure count starts again; the id is appended to
    ``<run_dir>/slurm_jobs.txt``. ``SlurmError`` if sbatch is missing or refuses."""
    run_dir = run_dir_of(job)
    text = render(job, run_dir)
    exe = shutil.which(sbatch)
    if exe is None:
        raise SlurmError(f"{sbatch!r} not found on PATH: submit from a Slurm login node")
    script = _new_script(Path(job.output_dir), job.job_name, text)
    Path(failures_file(job, run_dir)).unlink(missing_ok=True)  # a new submission, a new budget
    try:
        proc = subprocess.run(
            [exe, "--parsable", str(script)], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"sbatch {script}: {e}") from None
    if proc.returncode != 0:
        reason = proc.stderr.strip() or proc.stdout.strip() or "no message"
        raise SlurmError(f"sbatch {script} failed (exit {proc.returncode}): {reason}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "<id>[;<cluster>]"
    if not job_id.isascii() or not job_id.isdigit():
        raise SlurmError(f"sbatch {script}: unexpected output {proc.stdout!r}")
    _record_job(run_dir, job_id, str(script.resolve()))
    return job_id


def _new_script(folder: Path, job_name: str, text: str) -> Path:
    """A fresh file: a queued job keeps the script it was submitted with."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = folder / f"{job_name}-{stamp}{f'-{n}' if n else ''}.sbatch"
        try:
            with open(path, "x") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise SlurmError(f"cannot create a new script file in {folder}")


def _record_job(run_dir: Path, job_id: str, note: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / JOBS_FILE, "a") as f:
        f.write(f"{job_id}\t{note}\n")


# --------------------------------------------------------------------------- status


def status(run_dir: Path, scontrol: str = "scontrol") -> str:
    """A short report: latest checkpoint and step, W&B run id, and the Slurm jobs recorded
    in ``slurm_jobs.txt`` with their state from ``scontrol show job``."""
    run_dir = Path(run_dir)
    lines = [f"run: {run_dir}", *_checkpoint_lines(run_dir), "slurm jobs:"]
    jobs = _recorded_jobs(run_dir)
    if not jobs:
        lines.append(f"  none recorded in {run_dir / JOBS_FILE}")
    exe = shutil.which(scontrol)
    for job_id, note in jobs:
        state = _job_state(exe, job_id) if exe else "state unknown: no scontrol"
        lines.append(f"  {job_id}  {state}  {note}")
    return "\n".join(lines)


def _checkpoint_lines(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    try:
        name = (root / "latest").read_text().strip()
    except OSError:
        return ["checkpoint: none yet", "step: 0", "wandb run id: unknown"]
    try:
        step = str(json.loads((root / name / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        step = f"unknown (meta.json: {e})"
    return [f"checkpoint: {name}", f"step: {step}", f"wandb run id: {_run_id(root / name)}"]


def _run_id(ckpt: Path) -> str:
    """The W&B run id saved in rank 0's file; mmap: the id without reading the weights."""
    try:
        import torch

        state = torch.load(ckpt / "rank_00000.pt", map_location="cpu", weights_only=True, mmap=True)
        return str(state["train"]["run_id"]) or "unknown"
    except Exception:  # a missing, truncated or foreign file: the report goes on
        return "unknown"


def _recorded_jobs(run_dir: Path) -> list[tuple[str, str]]:
    try:
        text = (run_dir / JOBS_FILE).read_text()
    except OSError:
        return []
    jobs = []
    for line in text.splitlines():
        job_id, _, note = line.partition("\t")
        if job_id.strip():
            jobs.append((job_id.strip(), note))
    return jobs


def _job_state(scontrol: str, job_id: str) -> str:
    try:
        proc = subprocess.run(
            [scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"state unknown: {e}"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no message"]
        return f"state unknown: {lines[0]}"  # e.g. purged after MinJobAge
    fields = dict(_SCONTROL_FIELD.findall(proc.stdout))
    state = fields.get("JobState", "?")
    if fields.get("Reason", "None") != "None":
        state += f" ({fields['Reason']})"
    exit_code, restarts = fields.get("ExitCode", "?"), fields.get("Restarts", "?")
    return f"{state}  exit {exit_code}  restarts {restarts}  run time {fields.get('RunTime', '?')}"


# Fields of `scontrol show job -o` (one line of Key=Value, as Slurm 22.05 prints it).
_SCONTROL_FIELD = re.compile(r"(?:^|\s)(JobState|Reason|ExitCode|Restarts|RunTime)=(\S*)")


__all__ = [
    "REQUEUE_EXIT_CODE",
    "SlurmError",
    "SlurmJob",
    "failures_file",
    "parse_env",
    "render",
    "run_dir_of",
    "sbatch_options",
    "status",
    "submit",
    "time_limit_seconds",
]
