"""What a preemption costs a Slurm job of the tiny config, on a private local cluster
(testing/slurm_cluster.py: slurmctld and slurmd on this host; needs root and Slurm).

One job is submitted with ``seqboat slurm submit`` (W&B offline, one metrics record per
step) and, at chosen steps, told to stop the way Slurm warns before a time limit or a
preemption: ``scancel -b -s USR1`` to the batch shell. Each time it finishes its step, saves,
exits 75, requeues itself and resumes. Measured from the outside (metrics.jsonl polled every
20 ms, ``scontrol``) and from the run's own ``checkpoint/save_s``:

* submit -> first step: submission to the first training step's record (scheduling,
  Python and torch imports, model build, W&B start, the first step);
* for each stop: the step in progress when the signal went out (the last logged step + 1),
  the step saved, its save time (``checkpoint/save_s``), the time from the signal until the
  job is requeued (step finished, saved, W&B closed, exit 75, ``scontrol requeue``), until
  it runs again (Slurm's requeue delay, ~10 s here: cred_expire), and until the next
  segment's first step (the whole downtime), and the steps trained twice (0 when the next
  segment resumes right after the step in progress). "a kill would lose" is what the same
  moment costs without the handler: the steps since the last periodic checkpoint.

    python bench/slurm_preemption.py                      # 1 task, stops at 40 140 230
    python bench/slurm_preemption.py --nodes 2 --tasks-per-node 2 --stops 60 160
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testing.slurm_cluster: the cluster the tests use

from pretrain.config import parse_yaml  # noqa: E402
from pretrain.monitor import read_metrics  # noqa: E402
from testing.local import free_ports  # noqa: E402
from testing.slurm_cluster import FINISHED, slurm_cluster, unavailable_reason  # noqa: E402

POLL_S = 0.02


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--tasks-per-node", type=int, default=1)
    ap.add_argument("--stops", type=int, nargs="+", default=[40, 140, 230],
                    help="steps after which to send the stop signal")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=300")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot run a local Slurm cluster: {reason}", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="seqboat-bench-") as tmp,
        slurm_cluster(nodes=args.nodes, cpus_per_node=4) as cluster,
    ):
        rows, first_step_s, info = run(cluster, Path(tmp), args)
    print_table(rows, first_step_s, info, args)
    return 0


def run(cluster, work: Path, args) -> tuple[list[dict], float, dict]:
    run_dir = work / "run"
    (port,) = free_ports(1)
    env = {k: v for k, v in cluster.env.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", SEQBOAT_CACHE_DIR=str(work / "cache"), WANDB_MODE="offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[name] = str(work / "wandb-home")
    overrides = ["train.log_interval=1", "wandb.mode=offline", *args.overrides]
    submit = [
        sys.executable, "-m", "pretrain", "slurm", "submit", "--config", args.config,
        "--nodes", str(args.nodes), "--tasks-per-node", str(args.tasks_per_node),
        "--job-name", "bench", "--python", sys.executable, "--env", f"MASTER_PORT={port}",
        f"run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    # The tokenizer first (as a user prepares a run): not part of the start-up measured.
    prepare = [sys.executable, "-m", "pretrain", "prepare", "tokenizer", "--config", args.config,
               f"run.dir={run_dir}", *overrides]  # fmt: skip
    out = subprocess.run(prepare, env=env, cwd=work, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"prepare failed: {out.stderr}")
    t0 = time.monotonic()
    out = subprocess.run(submit, env=env, cwd=work, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"submit failed: {out.stderr}")
    job_id = re.fullmatch(r"submitted job (\d+)\n", out.stdout).group(1)
    metrics = run_dir / "metrics.jsonl"

    def last_step() -> int:
        steps = [r["step"] for r in read_metrics(metrics) if "train/loss" in r]
        return steps[-1] if steps else 0

    def log() -> str:
        return "\n".join(p.read_text(errors="replace") for p in work.glob("slurm-logs/*.out"))

    cluster.wait("the first training step", lambda: last_step() >= 1, 600, every_s=POLL_S)
    first_step_s = time.monotonic() - t0
    rows = []
    for n, target in enumerate(args.stops, start=1):
        cluster.wait(f"step {target}", lambda t=target: last_step() >= t, 900, every_s=POLL_S)
        in_progress = last_step() + 1
        t_signal = time.monotonic()
        cluster.run("scancel", "-b", "-s", "USR1", job_id)
        cluster.wait(
            "the requeue", lambda n=n: int(cluster.job(job_id).get("Restarts", 0)) >= n, 300
        )
        t_requeued = time.monotonic()
        cluster.wait("the job to run again", lambda: cluster.job(job_id)["JobState"] == "RUNNING",
                     300, every_s=0.1)  # fmt: skip
        t_running = time.monotonic()
        saved = [int(s) for s in re.findall(r"stopped on request at step (\d+);", log())][-1]
        # The next segment truncates metrics.jsonl back to the step saved, then trains on.
        cluster.wait(
            "the next segment's first step",
            lambda s=saved, n=n: _segment_started(metrics, s, n),
            600,
            every_s=POLL_S,
        )
        t_resumed = time.monotonic()
        records = read_metrics(metrics)
        save_s = [r["checkpoint/save_s"] for r in records
                  if r["step"] == saved and "checkpoint/save_s" in r][-1]  # fmt: skip
        first_new = min(r["step"] for r in records if r.get("run/restarts") == n)
        interval = _interval(run_dir)
        rows.append({
            "signal at": in_progress,
            "saved": saved,
            "save_s": save_s,
            "signal -> requeued s": t_requeued - t_signal,
            "-> running s": t_running - t_signal,
            "-> next step s": t_resumed - t_signal,
            "steps redone": saved + 1 - first_new,
            "a kill would lose": in_progress - 1 - (in_progress - 1) // interval * interval,
        })  # fmt: skip
    final = cluster.wait_job(job_id, FINISHED, 1800, every_s=0.5)
    info = {
        "job": job_id,
        "state": final["JobState"],
        "restarts": final["Restarts"],
        "total_s": time.monotonic() - t0,
        "steps": last_step(),
        "interval": _interval(run_dir),
    }
    return rows, first_step_s, info


def _segment_started(metrics: Path, saved: int, restarts: int) -> bool:
    return any(r.get("run/restarts") == restarts and r["step"] > saved
               for r in read_metrics(metrics))  # fmt: skip


def _interval(run_dir: Path) -> int:
    return int(parse_yaml((run_dir / "config.yaml").read_text())["checkpoint"]["interval"])


def print_table(rows: list[dict], first_step_s: float, info: dict, args) -> None:
    shape = f"{args.nodes} node(s) x {args.tasks_per_node} task(s)"
    print(f"config {Path(args.config).name} {' '.join(args.overrides)} on {shape}, "
          f"checkpoint.interval={info['interval']}, W&B offline")  # fmt: skip
    print(f"submit -> first training step: {first_step_s:.1f} s")
    cols = list(rows[0]) if rows else []
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")
    print(f"job {info['job']}: {info['state']}, {info['restarts']} restarts, step "
          f"{info['steps']}, {info['total_s']:.0f} s from submission")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
