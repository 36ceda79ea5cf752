"""``checkpoint.async``: saves written and published by a writer process.

In-process (one rank): a save whose writer is held back while training runs three more
steps still holds the state of the step it was taken at (resuming from it continues the
synchronous run bit for bit), and megatron-core's check of the sharding ran on its first
save only (the sharding did not change), which a changed sharding triggers again; a stop
request during an in-flight save waits for it, saves the step it stopped at, and stops.
Under torchrun (DP 2): a rank SIGKILLed while its background writer runs leaves ``latest``
on the previous complete checkpoint, and the run resumes from there bit for bit. (The Slurm
cluster test runs its preempted job with ``checkpoint.async=true`` too:
tests/test_slurm_cluster.py.) And a ``latest`` that names a deleted checkpoint falls back to
the newest complete one. A background save is written by another process (nothing of it runs
in the training process after the staging) and writes the same files as a synchronous save.
The writer process: a collective of it that times out is named like the training's, a
process group made without the launcher's store is refused, and a run that fails kills its
writer at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor, state_dict_utils, validation
from megatron.core.dist_checkpointing.serialization import load_plain_tensors
from torch.distributed.checkpoint import FileSystemReader

from parallel.dims import ParallelDims
from parallel.timeouts import CollectiveTimeout, collective_timeout
from pretrain.checkpoint import (
    LATEST,
    PAUSE_ENV,
    WRITE_PAUSE_ENV,
    CheckpointError,
    ShardingCheck,
    complete_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from pretrain.checkpointer import Checkpointer
from pretrain.monitor import read_metrics
from pretrain.train import Preempted, Trainer
from testing.local import finish_launch, launch_train, paused_ranks, subprocess_env
from testing.small_run import SMALL_RUN
from tests.test_train import small_config, train_losses


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps, checkpoints at 4 and 8 written synchronously."""
    run_dir = tmp_path_factory.mktemp("sync") / "run"
    Trainer(small_config(run_dir), progress=False).train()
    return run_dir


def _point_latest_at(run_dir: Path, step: int) -> None:
    """Drops the checkpoints after ``step`` (as if the run had stopped there)."""
    ckpts = run_dir / "checkpoints"
    for path in complete_checkpoints(run_dir):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    (ckpts / LATEST).write_text(f"step_{step:08d}\n")


def _count_sharding_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the runs of megatron-core's sharding check (however it is reached)."""
    calls: list[int] = []
    original = validation.validate_sharding_integrity

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(validation, "validate_sharding_integrity", counted)
    monkeypatch.setattr(state_dict_utils, "validate_sharding_integrity", counted)
    return calls


def test_a_background_save_holds_the_step_it_was_taken_at(
    synchronous: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step-4 writer is held, before it writes any tensor, until step 7 has started:
    the published step-4 checkpoint still resumes into the synchronous run's steps 5..8, bit
    for bit (the tensors were copied at step 4, not read while steps 5..7 changed them).
    The sharding is checked on the first save of each run only: the step-8 save, with the
    same sharding, is not checked again and resumes all the same."""
    run_dir = tmp_path / "async"
    marker = tmp_path / "release"
    checks = _count_sharding_checks(monkeypatch)
    monkeypatch.setenv(WRITE_PAUSE_ENV, f"4:{marker}")
    original = Trainer.train_step
    during: dict[str, object] = {}

    def release_at_step_7(self: Trainer, collect_stats: bool):
        if self.step == 6:
            during["writer waiting"] = Path(f"{marker}.rank0").is_file()
            during["published"] = [p.name for p in complete_checkpoints(run_dir)]
            marker.touch()
        return original(self, collect_stats)

    monkeypatch.setattr(Trainer, "train_step", release_at_step_7)
    trainer = Trainer(small_config(run_dir, "checkpoint.async=true"), progress=False)
    trainer.train()
    monkeypatch.setattr(Trainer, "train_step", original)
    monkeypatch.delenv(WRITE_PAUSE_ENV)
    assert during == {"writer waiting": True, "published": []}  # step 4 was still in flight
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_00000004", "step_00000008"]
    # Saves at steps 4 and 8, one sharding: the writer process checked it once.
    assert (len(checks), trainer.checkpointer.sharding_checks) == (0, 1)
    assert train_losses(run_dir) == train_losses(synchronous)
    # The step-8 save, not checked, holds the synchronous run's tensors.
    ours, theirs = (
        _plain_tensors(r / "checkpoints" / "step_00000008") for r in (run_dir, synchronous)
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    written = [r for r in read_metrics(run_dir / "metrics.jsonl") if "checkpoint/write_s" in r]
    # Every background save's writing time is logged once, however late it finished.
    assert [r["checkpoint/written_step"] for r in written] == [4, 8]
    assert written[0]["step"] in (7, 8)

    _point_latest_at(run_dir, 4)
    resumed = Trainer(small_config(run_dir, "checkpoint.async=true"), progress=False)
    assert resumed.step == 4
    resumed.train()
    assert train_losses(run_dir) == train_losses(synchronous)  # steps 5..8 again, the same
    # The resumed run's load (megatron's check, here) and its first save (the writer's).
    assert (len(checks), resumed.checkpointer.sharding_checks) == (1, 1)


def _plain_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole (megatron-core's reader)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return load_plain_tensors(str(ckpt / "model"))
    finally:
        dist.destroy_process_group()


def test_the_sharding_is_checked_again_when_it_changes() -> None:
    """``ShardingCheck`` runs megatron-core's check when the sharding differs from the one
    it checked last (a tensor cut in two halves of which only one is saved: refused), and
    not for the sharding it checked already."""
    whole = [ShardedTensor.from_rank_offsets("w", torch.zeros(4, 2), replica_id=0)]
    half = [ShardedTensor.from_rank_offsets("w", torch.zeros(2, 2), (0, 0, 2), replica_id=0)]
    check = ShardingCheck()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # megatron-core's check asks for the rank
        check([[t.without_data() for t in whole]])
        check([[t.without_data() for t in whole]])
        assert check.runs == 1
        with pytest.raises(CheckpointError, match="invalid sharding"):
            check([[t.without_data() for t in half]])
        assert check.runs == 2
    finally:
        dist.destroy_process_group()


def test_a_background_save_is_written_by_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process, no process group (``seqboat train`` on one process): a background save
    writes nothing in this process (no process group made, no shard file written, no
    sharding check run: the writer process does all that, so its Python work never holds
    this process's GIL), checks the sharding once for two saves, and writes the files of the
    synchronous save, byte for byte (the same checksums)."""
    from pretrain import checkpoint

    model, optimizer = _small_model()
    Checkpointer(model, optimizer, ParallelDims.single()).save(tmp_path / "sync", 1, {})
    here: list[str] = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: here.append("group"))
    monkeypatch.setattr(checkpoint, "_write_shards", lambda *a, **k: here.append("shards"))
    checks = _count_sharding_checks(monkeypatch)
    background = Checkpointer(model, optimizer, ParallelDims.single(), background=True)
    try:
        for step in (1, 2):  # the first save checks the sharding, the second does not
            background.save(tmp_path / "async", step, {})
            background.wait()
    finally:
        background.close()
    assert (here, len(checks), background.sharding_checks) == ([], 0, 1)
    assert not dist.is_initialized()
    _assert_same_files(tmp_path / "sync", tmp_path / "async", 1)


def _assert_same_files(sync_run: Path, async_run: Path, step: int) -> None:
    """The checkpoints of ``step`` hold the same files, byte for byte."""
    from pretrain.checkpoint import read_meta, step_name

    sync, async_ = (r / "checkpoints" / step_name(step) for r in (sync_run, async_run))
    # torch DCP's .metadata names its folder and a random save id; the rest must be equal.
    files = read_meta(sync)["sha256"]
    assert files == read_meta(async_)["sha256"] | {"model/.metadata": files["model/.metadata"]}
    a, b = (FileSystemReader(c / "model").read_metadata() for c in (sync, async_))
    assert (a.state_dict_metadata, a.storage_data) == (b.state_dict_metadata, b.storage_data)


def test_the_sharded_state_dict_is_built_once_per_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background save builds megatron's sharded state dict (and sends it to the writer)
    only when the layout of the tensors changed: here the first save, before the optimizer
    has state, and the second, after its first step; the third, after another step, copies
    the tensors into the same buffers and nothing else. Each save writes the synchronous
    save's files, byte for byte."""
    model, optimizer = _small_model(steps=0)
    background = Checkpointer(model, optimizer, ParallelDims.single(), background=True)
    built = []
    build = background.sharded_state_dict
    monkeypatch.setattr(background, "sharded_state_dict", lambda: built.append(1) or build())
    try:
        for step in (1, 2, 3):
            if step > 1:
                _optimizer_step(model, optimizer)
            background.save(tmp_path / "async", step, {})
            background.wait()
            Checkpointer(model, optimizer, ParallelDims.single()).save(tmp_path / "sync", step, {})
            assert len(built) == min(step, 2)
    finally:
        background.close()
    for step in (1, 2, 3):
        _assert_same_files(tmp_path / "sync", tmp_path / "async", step)


def _small_model(steps: int = 1) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A 2-layer model and its AdamW, after ``steps`` steps on random gradients."""
    from pretrain.build import optimizer_for
    from pretrain.config import ModelConfig, OptimizerConfig
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    cfg = ModelConfig(layers=2, width=32, zdim=8, hdim=32, ndim=4, window=4, vocab_multiple=16)
    model = LanguageModel(cfg, 50)
    optimizer = optimizer_for(model, OptimizerConfig(lr=1e-2))
    for _ in range(steps):
        _optimizer_step(model, optimizer)
    return model, optimizer


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def _save_alone(rank: int, world: int, root: str) -> CollectiveTimeout | None:
    """Rank 0 saves, rank 1 does not: rank 0's writer waits in the writers' first barrier
    until their timeout; rank 0's next wait raises what timed out."""
    from pretrain.background_save import BackgroundWriteError
    from testing.local import gloo_world

    with gloo_world(rank, world):
        model, optimizer = _small_model()
        background = Checkpointer(
            model, optimizer, ParallelDims.single(), background=True, timeout_s=3
        )
        error = None
        if rank == 0:
            background.save(Path(root), 1, {})
            with pytest.raises(BackgroundWriteError) as raised:
                background.wait()
            error = collective_timeout(raised.value)
        dist.barrier()
        background.close()  # the writers leave their world together, the failed one too
    return error


def test_a_writer_collective_that_times_out_is_named(tmp_path: Path) -> None:
    """A background write whose collective times out (the other rank's writer never came)
    fails the training rank's next wait with what ``parallel/timeouts.py`` reads from a
    collective's timeout, as for the training's own: the barrier, over ranks 0 and 1, in
    ``pretrain/checkpoint.py``; both writers still stop in step."""
    from testing.local import run_ranks

    timeout, none = run_ranks(_save_alone, 2, str(tmp_path), timeout=120)
    assert none is None and timeout is not None
    assert (timeout.collective, timeout.ranks) == ("barrier", [0, 1])
    assert timeout.call_site.startswith("pretrain/checkpoint.py:")


def test_a_stop_during_a_background_save_saves_and_stops(
    synchronous: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR1 while the step-4 save is still being written: the run finishes step 5, waits
    for the step-4 save, saves step 5 and stops; resuming continues the synchronous run."""
    run_dir = tmp_path / "async"
    marker = tmp_path / "release"
    monkeypatch.setenv(PAUSE_ENV, f"4:{marker}")
    original = Trainer.train_step

    def signal_during_step_5(self: Trainer, collect_stats: bool):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
            threading.Timer(1.0, marker.touch).start()  # the writer goes on a second later
        return original(self, collect_stats)

    monkeypatch.setattr(Trainer, "train_step", signal_during_step_5)
    sigterm = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        Trainer(small_config(run_dir, "checkpoint.async=true"), progress=False).train()
    signal.signal(signal.SIGTERM, sigterm)
    monkeypatch.setattr(Trainer, "train_step", original)
    monkeypatch.delenv(PAUSE_ENV)
    assert stopped.value.step == 5
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_00000004", "step_00000005"]
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == "step_00000005"

    Trainer(small_config(run_dir, "checkpoint.async=true"), progress=False).train()
    assert train_losses(run_dir) == train_losses(synchronous)


# --------------------------------------------------------------------------- torchrun

RUN = [*SMALL_RUN, "train.max_steps=8", "checkpoint.interval=2", "train.eval_interval=100"]


def _launch(tmp_path: Path, name: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m pretrain train`` (DP 2) in the background."""
    return launch_train(tmp_path, name, 2, [*RUN, *extra], subprocess_env(**(env or {})))


def _losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir / "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
def test_a_rank_killed_while_its_writer_runs_keeps_latest_complete(tmp_path: Path) -> None:
    """DP 2 with checkpoint.async: rank 1 is SIGKILLed while its background writer of the
    step-6 save is paused (its training thread went on); ``latest`` stays on step 4, the
    partial step 6 is never published, and the next run resumes from step 4 and matches a
    synchronous run bit for bit."""
    straight = _launch(tmp_path, "straight")
    assert finish_launch(straight) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    marker = tmp_path / "pause6"
    proc = _launch(tmp_path, "run", "checkpoint.async=true", env={PAUSE_ENV: f"6:{marker}"})
    pids, code = [], None
    try:
        pids = paused_ranks(marker, 2)
        os.kill(pids[1], signal.SIGKILL)
        marker.touch()  # rank 0's writer goes on, and fails at the barrier
    finally:
        code = finish_launch(proc, pids)
    assert code != 0
    assert (ckpts / LATEST).read_text().strip() == "step_00000004"
    assert not (ckpts / "step_00000006").exists()
    load_checkpoint(ckpts / "step_00000004")  # every checksum verifies

    proc = _launch(tmp_path, "run", "checkpoint.async=true")
    assert finish_launch(proc) == 0, (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    assert "from step_00000004" in log
    assert not (ckpts / "step_00000006.tmp").exists()
    a, b = _losses(tmp_path / "straight"), _losses(run)
    assert list(a) == list(b) == list(range(1, 9))
    assert a == b  # bit for bit


def test_latest_naming_a_deleted_checkpoint_falls_back_to_the_newest(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``latest`` names a checkpoint that is gone (pruning keeps the highest steps, so a run
    resumed from further back can see its new save pruned; or deleted by hand): the newest
    complete checkpoint loads, with a warning, instead of none (a restart from scratch)."""
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": torch.full((2,), float(step))})
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000001")
    (tmp_path / "checkpoints" / LATEST).write_text("step_00000001\n")
    state, path = load_latest(tmp_path)
    assert path.name == "step_00000003" and state["x"][0] == 3
    assert "names step_00000001, which is not a complete checkpoint" in capsys.readouterr().err


def test_a_writer_without_the_launchers_store_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process group of 2 made without the launcher's variables (no RANK, WORLD_SIZE,
    MASTER_ADDR/PORT): the writers could not meet, so building one says so at once."""
    from pretrain.background_save import BackgroundWriter

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(RuntimeError, match="MASTER_ADDR/MASTER_PORT"):
        BackgroundWriter()


def test_a_failed_run_stops_its_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that raises (not a stop request) with a save in flight kills its writer process
    at once instead of leaving it, and the memory it shares, to the end of the process."""
    original = Trainer.train_step

    def fail_at_step_6(self: Trainer, collect_stats: bool):
        if self.step == 5:
            raise RuntimeError("injected")
        return original(self, collect_stats)

    monkeypatch.setattr(Trainer, "train_step", fail_at_step_6)
    trainer = Trainer(small_config(tmp_path / "run", "checkpoint.async=true"), progress=False)
    process = trainer.checkpointer.writer._process
    with pytest.raises(RuntimeError, match="injected"):
        trainer.train()
    assert trainer.checkpointer.writer is None
    assert process.poll() is not None  # gone (reaped), not waiting for work
