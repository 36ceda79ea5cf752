"""A private Slurm cluster on this host, for tests: ``slurm_cluster()`` brings it up and
tears down exactly what it started.

One munged, one slurmctld and one slurmd per emulated node (``node1``, ``node2``, ...), all
Debian's Slurm 22.05 packages, with every file (config, key, sockets, state, spool, logs) in
one private folder that is removed at the end. Each Slurm daemon runs in its own mount, UTS
and PID namespace: the node's hostname, a bind-mounted private ``/etc/hosts`` that maps
``nodeN`` to ``127.0.1.N`` (so ``MASTER_ADDR=node1`` resolves inside jobs and all traffic
stays on loopback), and a process tree that dies as a whole when the namespace's first
process (the daemon) is killed: job steps cannot outlive the cluster. The machine's
``/etc/hosts`` and Slurm configuration are never touched; ``SLURM_CONF`` is set only in the
environments this module hands out (``SlurmCluster.env``).

Settings measured on Slurm 22.05.8: ``cred_expire=10`` and ``sched_interval=2`` let a
requeued job start again seconds later instead of minutes; ``SlurmdParameters=
config_overrides`` lets each node advertise more CPUs than the host has. Daemons and jobs
run as root, with ``proctrack/linuxproc`` and ``task/none``: no cgroups, no systemd.

Needs root, ``unshare`` and the Slurm and munge binaries: ``unavailable_reason()`` says
which is missing (tests skip with it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testing.local import free_ports

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
CONTROLLER = "slurmctl"  # the controller's hostname inside its namespace
PREFIX = "seqboat-slurm-"  # of the private folder, in the temporary directory
MARKER = "SEQBOAT_SLURM_CLUSTER"  # in every process's environment: the private folder
# Job states after which nothing more happens (a requeued job goes back to PENDING instead).
FINISHED = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "OUT_OF_MEMORY",
}  # fmt: skip

_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")  # daemons live here, maybe not on PATH


class ClusterError(RuntimeError):
    """The cluster did not come up, or a wait ran out; the message holds the logs' tails."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def unavailable_reason() -> str | None:
    """Why this machine cannot host the cluster, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their user; namespaces need CAP_SYS_ADMIN)"
    if _which("unshare") is None:
        return "needs unshare (util-linux) for one namespace per emulated node"
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if missing:
        return (
            f"Slurm/munge binaries missing: {', '.join(missing)} (Debian: apt-get install "
            "slurmctld slurmd slurm-client munge; .ci/run does this when it runs as root)"
        )
    probe = subprocess.run(
        [_which("unshare"), "--mount", "--uts", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"unshare --mount --uts --pid does not work here: {probe.stderr.strip()}"
    return None


# --------------------------------------------------------------------------- the cluster


@dataclass
class SlurmCluster:
    root: Path  # the private folder
    nodes: list[str]
    env: dict[str, str]  # for Slurm clients (and so for jobs): SLURM_CONF is set here only
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *argv: str, check: bool = True, timeout_s: float = 30):
        """A Slurm client command against this cluster, run in the private folder (where
        e.g. sbatch's default slurm-<id>.out would go, and so be removed with it)."""
        proc = subprocess.run(
            list(argv), env=self.env, cwd=self.root / "work", capture_output=True, text=True,
            timeout=timeout_s,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a mapping (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(?:^|\s)([A-Za-z/:]+)=(\S*)", out))

    def jobs(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i", check=False).stdout
        return out.split()

    def wait(self, what: str, ready: Callable[[], object], timeout_s: float, every_s=0.25):
        """Poll ``ready()`` until it returns something truthy (returned), at most
        ``timeout_s``; ``ClusterError`` with the logs' tails otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_daemons()
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}\n"
                                   + self.logs())  # fmt: skip
            time.sleep(every_s)

    def wait_job(
        self, job_id: str, states: set[str], timeout_s: float, every_s: float = 0.25
    ) -> dict[str, str]:
        def reached() -> dict[str, str] | None:
            fields = self.job(job_id)
            return fields if fields.get("JobState") in states else None

        return self.wait(f"job {job_id} to reach {sorted(states)}", reached, timeout_s, every_s)

    def _check_daemons(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited ({proc.returncode})\n" + self.logs())

    def logs(self, lines: int = 15) -> str:
        """The last ``lines`` lines of every daemon's log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


@contextlib.contextmanager
def slurm_cluster(
    nodes: int = 2, cpus_per_node: int = 4, start_timeout_s: float = 60
) -> Iterator[SlurmCluster]:
    """A running cluster of ``nodes`` nodes (each advertising ``cpus_per_node`` CPUs, one
    partition ``test``), torn down on exit: jobs cancelled, daemons stopped by pid (and with
    them every process in their namespaces), the private folder removed. Raises
    ``ClusterError`` if the cluster is not up within ``start_timeout_s``, or if a process of
    the cluster outlived the teardown (it is killed first)."""
    # Short path: the munge socket's must fit in 108 bytes. A fresh folder every time: job
    # ids start again at 1 on a new cluster.
    _remove_stale_folders()
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    (root / "owner").write_text(f"{os.getpid()}\n")
    names = [f"node{i}" for i in range(1, nodes + 1)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(SLURM_CONF=str(root / "slurm.conf"), **{MARKER: str(root)})
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
    cluster = SlurmCluster(root=root, nodes=names, env=env)
    try:
        _write_files(cluster, cpus_per_node)
        _start(cluster)
        cluster.wait("the nodes to be idle", lambda: _all_idle(cluster), start_timeout_s)
        yield cluster
    finally:
        _teardown(cluster)


def _remove_stale_folders() -> None:
    """Private folders left by a test process that was killed before its teardown (its
    daemons died with it: see ``die_with_parent``)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((folder / "owner").read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created
        if not Path(f"/proc/{owner}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _write_files(cluster: SlurmCluster, cpus: int) -> None:
    root = cluster.root
    for sub in ("munge", "log", "state", "run", "work", *(f"spool/{n}" for n in cluster.nodes)):
        (root / sub).mkdir(parents=True, mode=0o700)
    # munged wants its socket's folder and the ones above searchable by all.
    for folder in (root, root / "munge"):
        folder.chmod(0o711)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (root / "plugstack.conf").write_text("")
    hosts = ["127.0.0.1 localhost", f"127.0.0.1 {CONTROLLER}"]
    hosts += [f"127.0.1.{i} {name}" for i, name in enumerate(cluster.nodes, start=1)]
    (root / "hosts").write_text("\n".join(hosts) + "\n")
    ctl_port, *node_ports = free_ports(1 + len(cluster.nodes))
    socket = root / "munge" / "munge.socket"
    lines = [
        "ClusterName=seqboattest",
        f"SlurmctldHost={CONTROLLER}(127.0.0.1)",
        f"SlurmctldPort={ctl_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire: a requeued job may start again after this many seconds (default 120).
        f"AuthInfo=socket={socket},cred_expire=10",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        f"PlugStackConfig={root}/plugstack.conf",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups, no systemd: track processes by their parents, bind nothing.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",  # more CPUs than the host has
        "MailProg=/bin/true",
        "JobRequeue=1",
        "ReturnToService=2",
        "MinJobAge=3600",  # finished jobs stay visible to scontrol
        "KillWait=5",  # TERM to KILL on cancel: short, so teardown is quick
        "InactiveLimit=0",
        # The scheduler passes every 2 s (default 60 s).
        "SchedulerParameters=sched_interval=2,bf_interval=2",
    ]
    for i, (name, port) in enumerate(zip(cluster.nodes, node_ports, strict=True), start=1):
        lines.append(
            f"NodeName={name} NodeHostname={name} NodeAddr=127.0.1.{i} Port={port} "
            f"CPUs={cpus} State=UNKNOWN"
        )
    lines.append(f"PartitionName=test Nodes={','.join(cluster.nodes)} Default=YES "
                 "MaxTime=INFINITE State=UP")  # fmt: skip
    cluster.conf.write_text("\n".join(lines) + "\n")


def _spawn(cluster: SlurmCluster, name: str, argv: list[str]) -> None:
    with open(cluster.root / "log" / f"{name}.stdout.log", "wb") as log:
        cluster.procs[name] = subprocess.Popen(
            argv, env=cluster.env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGKILL when the test process dies, however it
    dies (also a SIGKILL, where no teardown runs)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def isolated(argv: list[str]) -> list[str]:
    """``argv`` as the first process of a new PID namespace: when it ends, or the test
    process dies (with ``preexec_fn=die_with_parent``), every process it started ends too.
    Needs what the cluster needs (root, unshare)."""
    pid_ns = ["--pid", "--fork", "--mount", "--mount-proc", "--kill-child"]
    return [_which("unshare"), *pid_ns, "--", *argv]


def _in_namespace(cluster: SlurmCluster, hostname: str, argv: list[str]) -> list[str]:
    """``argv`` as the first process of new mount, UTS and PID namespaces, with
    ``hostname`` and the private hosts file. ``--kill-child``: killing unshare (the pid we
    keep) kills the daemon, and the daemon's end kills everything else in its namespace."""
    script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
    unshare = [_which("unshare"), "--mount", "--uts", "--pid", "--fork", "--mount-proc",
               "--kill-child"]  # fmt: skip
    return [*unshare, "--", "sh", "-c", script, "sh", str(cluster.root / "hosts"), hostname, *argv]


def _start(cluster: SlurmCluster) -> None:
    root = cluster.root
    munge = root / "munge"
    _spawn(cluster, "munged", [
        _which("munged"), "--foreground", f"--socket={munge}/munge.socket",
        f"--key-file={munge}/munge.key", f"--pid-file={root}/run/munged.pid",
        f"--log-file={root}/log/munged.log", f"--seed-file={munge}/munged.seed",
    ])  # fmt: skip
    cluster.wait("munged's socket", (munge / "munge.socket").exists, 15, every_s=0.05)
    conf = str(cluster.conf)
    _spawn(
        cluster,
        "slurmctld",
        _in_namespace(cluster, CONTROLLER, [_which("slurmctld"), "-D", "-i", "-f", conf]),
    )
    for name in cluster.nodes:
        argv = [_which("slurmd"), "-D", "-N", name, "-f", conf]
        _spawn(cluster, f"slurmd-{name}", _in_namespace(cluster, name, argv))


def _all_idle(cluster: SlurmCluster) -> bool:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
    states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    return all(states.get(name) == "idle" for name in cluster.nodes)


# --------------------------------------------------------------------------- teardown


def _teardown(cluster: SlurmCluster) -> None:
    errors = []
    try:
        _cancel_jobs(cluster)
    except Exception as e:  # the daemons go anyway, below
        errors.append(f"cancelling jobs: {e}")
    # Nodes first, controller, then munge; each by the pid we started it with.
    order = sorted(cluster.procs, key=lambda n: ("slurmd" not in n, n != "slurmctld"))
    for name in order:
        _stop(cluster.procs[name])
    stray = _wait_for_strays(cluster.root, timeout_s=10)
    if stray:
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        errors.append(f"processes outlived the cluster (killed): {stray}")
    shutil.rmtree(cluster.root, ignore_errors=True)
    if errors:
        raise ClusterError("; ".join(errors))


def _cancel_jobs(cluster: SlurmCluster) -> None:
    """Cancel what is still queued or running and let it end (bounded): steps end the way
    they would on a real cluster, before their nodes go."""
    if cluster.procs.get("slurmctld") is None or cluster.procs["slurmctld"].poll() is not None:
        return
    jobs = cluster.jobs()
    if not jobs:
        return
    cluster.run("scancel", *jobs, check=False)
    deadline = time.monotonic() + 20
    while cluster.jobs() and time.monotonic() < deadline:
        time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the daemon (for slurmd and slurmctld: unshare's child, the first process
    of the namespace, whose end takes every other process of the namespace along), then
    SIGKILL to what we started if it has not ended within 10 s. With --kill-child, unshare
    going kills the daemon in turn."""
    if proc.poll() is None:
        target = _only_child(proc.pid) if _is_unshare(proc) else proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target or proc.pid, signal.SIGTERM if target else signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _is_unshare(proc: subprocess.Popen) -> bool:
    return Path(str(proc.args[0])).name == "unshare"


def _only_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


def _cluster_pids(root: Path) -> list[int]:
    """Processes of this cluster still alive: ours carry ``MARKER=<root>`` in their
    environment (daemons from ``_spawn``, jobs from the submitter's environment)."""
    needle = f"\0{MARKER}={root}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in b"\0" + environ and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_for_strays(root: Path, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (pids := _cluster_pids(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


__all__ = [
    "ClusterError",
    "SlurmCluster",
    "die_with_parent",
    "isolated",
    "slurm_cluster",
    "unavailable_reason",
]
