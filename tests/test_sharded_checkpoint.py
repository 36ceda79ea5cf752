"""Sharded checkpoints reshard the model and the Adam state across tensor, context and data
splits, in float64, exactly.

One spawn of 4 gloo processes. Every rank also trains the single-process reference (same
seed, same batches). Phase by phase the world is re-split (TP2 x DP2 -> DP4 -> CP2 x TP2 ->
TP4); each phase builds a model with other weights, loads the previous phase's checkpoint
(the first starts from the reference's step-0 weights), checks weights, Adam moments and
logits against the reference, takes one parallel step that must equal the reference's next
step, and saves. Then a truncated shard is reported by name and loading falls back.

The crash-safety test runs ``torchrun`` (TP 2 x DP 2): signals and a SIGKILL in the middle
of a save, paused there by ``SEQBOAT_CHECKPOINT_PAUSE``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_checkpoint
from pretrain.monitor import read_metrics
from testing.local import finish_launch, launch_train, paused_ranks, run_ranks, subprocess_env
from testing.small_run import SMALL_RUN

WORLD = 4
VOCAB = 50
SEQ = 16
BATCH = 4
# (name, tensor size, context size) of each phase, in order, on WORLD ranks.
PHASES = [("tp2-dp2", 2, 1), ("dp4", 1, 1), ("cp2-tp2", 2, 2), ("tp4", 4, 1)]


def model_config():
    from pretrain.config import ModelConfig

    return ModelConfig(layers=2, width=32, zdim=8, hdim=32, ndim=4, window=4, vocab_multiple=16)


def optimizer_config():
    from pretrain.config import OptimizerConfig

    return OptimizerConfig(lr=1e-2, weight_decay=0.1)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))


def objective_weights(step: int, vocab: int) -> torch.Tensor:
    """A float64 surrogate objective sum(logits * R): megatron's vocab-parallel cross-entropy
    computes in float32, this keeps the whole step in float64."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(SEQ, BATCH, vocab, dtype=torch.float64, generator=generator)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def max_error(got: dict, expected: dict) -> float:
    return max((relative_error(v, expected[k]) for k, v in got.items()), default=0.0)


def reference_run(steps: int) -> list[dict]:
    """The single-process model and Adam moments after 0 .. ``steps`` steps."""
    from pretrain.build import optimizer_for
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(model_config(), VOCAB).double()
    optimizer = optimizer_for(model, optimizer_config())
    states = []
    for step in range(steps + 1):
        states.append(snapshot(model, optimizer))
        if step < steps:
            logits = model(batch(step)[:, :-1])[0]
            ((logits * objective_weights(step, logits.shape[-1])).sum() / BATCH).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return states


def snapshot(model, optimizer) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {
        f"{names[id(p)]}.{k}": v.clone()
        for p, s in optimizer.state.items()
        for k, v in s.items()
        if k.startswith("exp_avg")
    }
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "adam": moments}


def gathered_moments(model, optimizer, tp) -> dict[str, torch.Tensor]:
    from parallel.tensor import gather_split, is_split

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, s in optimizer.state.items():
        for k, v in s.items():
            if k.startswith("exp_avg"):
                whole = gather_split(v, p.partition_dim, tp) if tp.active and is_split(p) else v
                out[f"{names[id(p)]}.{k}"] = whole
    return out


def run_phase(index: int, run_dir: Path, reference: list[dict], saved: dict) -> dict:
    """Loads (or, first, starts), checks, steps once, saves; returns the largest errors.
    ``saved``: the whole weights and moments the previous phase saved (updated here)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from parallel.grads import average_gradients, sum_partial_grads
    from parallel.tensor import full_state_dict, gather_split, shard_state_dict
    from pretrain.build import optimizer_for
    from pretrain.checkpointer import Checkpointer
    from pretrain.model.lm import LanguageModel

    name, tp_size, cp_size = PHASES[index]
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size, context_parallel_size=cp_size
    )
    dims = ParallelDims.from_parallel_state()
    tp, cp, dp_size = dims.tensor, dims.context, dims.dp_size
    torch.manual_seed(100 + index)  # other weights than the reference's: loading must set them
    model = LanguageModel(model_config(), VOCAB, tp=tp, cp=cp).double()
    optimizer = optimizer_for(model, optimizer_config())
    # By default copy 0 writes everything; or the copies share the writing.
    checkpointer = Checkpointer(model, optimizer, dims, spread=bool(index % 2))

    if index == 0:
        model.load_state_dict(shard_state_dict(reference[0]["model"], model, tp))
    else:
        restored = checkpointer.restore(run_dir)
        assert restored.path.name == f"step_{index:08d}" and restored.elastic

    expected = reference[index]
    loaded = {"model": full_state_dict(model, tp), "adam": gathered_moments(model, optimizer, tp)}
    assert set(loaded["adam"]) == set(expected["adam"]), name
    errors = {  # against what was saved: bit for bit; against the reference: round-off
        "not_exact": [
            f"{part}:{k}"
            for part in saved
            for k, v in loaded[part].items()
            if not torch.equal(v, saved[part][k])
        ],
        "weights": max_error(loaded["model"], expected["model"]),
        "adam": max_error(loaded["adam"], expected["adam"]),
    }
    tokens = batch(index)
    span = slice(cp.rank * SEQ // cp.size, (cp.rank + 1) * SEQ // cp.size)
    with torch.no_grad():
        logits = model(cp.chunk(tokens)[:, :-1])[0]
        logits = gather_split(logits, 2, tp) if tp.active else logits
        single = LanguageModel(model_config(), VOCAB).double()
        single.load_state_dict(expected["model"])
        errors["logits"] = relative_error(logits, single(tokens[:, :-1])[0][span])

    # One step: every data-parallel replica sees the whole batch, the context ranks their
    # chunks; averaging over data x context is then the reference's full-batch gradient.
    logits = model(cp.chunk(tokens)[:, :-1])[0]
    part = logits.shape[-1]
    weights = objective_weights(index, part * tp.size)[
        span, :, tp.rank * part : (tp.rank + 1) * part
    ]
    ((logits * weights).sum() * cp.size / BATCH).backward()
    sum_partial_grads(model, tp)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    average_gradients(model, group, dp_size * cp.size)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # What the checkpoint holds: global rank 0's whole view (the main replica of every
    # tensor; replicated tensors may differ by round-off on other tensor ranks).
    mine = {"model": full_state_dict(model, tp), "adam": gathered_moments(model, optimizer, tp)}
    box = [mine]
    dist.broadcast_object_list(box, src=0)
    saved.clear()
    saved.update(box[0])
    errors["next_step"] = max_error(mine["model"], reference[index + 1]["model"])
    checkpointer.save(run_dir, index + 1, {})
    return {name: errors}


def corrupt_and_fall_back(rank: int, run_dir: Path) -> dict:
    """Truncates one of rank 1's shard files of the newest checkpoint: every rank gets the
    error naming it, and load_latest falls back to the previous checkpoint."""
    import torch.distributed as dist

    from pretrain.checkpoint import CheckpointError, load_checkpoint, load_latest

    newest = run_dir / "checkpoints" / f"step_{len(PHASES):08d}"
    (shard,) = sorted((newest / "model").glob("__1_*.distcp"))
    if rank == 0:
        shard.write_bytes(shard.read_bytes()[:-7])
    dist.barrier()
    try:
        load_checkpoint(newest)
        message = ""
    except CheckpointError as e:
        message = str(e)
    _, path = load_latest(run_dir)
    return {"message": message, "shard": str(shard), "fallback": path.name}


def worker(rank: int, world: int, run_dir: Path) -> dict:
    from testing.local import gloo_world

    reference = reference_run(len(PHASES))
    out: dict = {}
    saved = {"model": reference[0]["model"], "adam": {}}
    with gloo_world(rank, world):
        for index in range(len(PHASES)):
            out.update(run_phase(index, run_dir, reference, saved))
        out["corrupt"] = corrupt_and_fall_back(rank, run_dir)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    run_dir = tmp_path_factory.mktemp("sharded")
    return run_ranks(worker, WORLD, run_dir, timeout=600), run_dir


@pytest.mark.parametrize("phase", [p[0] for p in PHASES])
def test_resharded_model_and_adam_equal_the_reference(results, phase: str) -> None:
    for rank_results in results[0]:
        errors = rank_results[phase]
        assert not errors["not_exact"], errors  # what was saved, bit for bit
        assert errors["weights"] < 1e-10 and errors["adam"] < 1e-10, errors
        assert errors["logits"] < 1e-10, errors
        assert errors["next_step"] < 1e-10, errors


def test_a_truncated_shard_is_named_and_the_previous_checkpoint_loads(results) -> None:
    for rank_results in results[0]:
        corrupt = rank_results["corrupt"]
        assert corrupt["shard"] in corrupt["message"], corrupt
        assert "checksum mismatch" in corrupt["message"]
        assert corrupt["fallback"] == f"step_{len(PHASES) - 1:08d}"


def test_a_single_process_loads_a_four_rank_checkpoint(results) -> None:
    """What ``load_trained`` does: the whole model from the TP2 x CP2 checkpoint."""
    from parallel.dims import ParallelDims
    from pretrain.checkpointer import Checkpointer
    from pretrain.model.lm import LanguageModel

    run_dir = results[1]
    model = LanguageModel(model_config(), VOCAB).double()
    ckpt = run_dir / "checkpoints" / f"step_{len(PHASES) - 1:08d}"
    Checkpointer(model, None, ParallelDims.single()).load_weights(ckpt)
    expected = reference_run(len(PHASES) - 1)[-1]["model"]
    for k, v in model.state_dict().items():
        assert torch.allclose(v, expected[k], rtol=1e-10, atol=0), k


# --------------------------------------------------------------------------- crash safety

RUN = [*SMALL_RUN, "train.max_steps=8", "train.eval_interval=4", "checkpoint.interval=2"]
TP2_DP2 = ["parallel.tensor=2"]


def launch(tmp_path: Path, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``torchrun --nproc_per_node 4 -m pretrain train`` (TP 2 x DP 2) in the background,
    output in ``<name>.log``."""
    env = subprocess_env(SEQBOAT_CACHE_DIR=str(tmp_path / "cache"), **(env or {}))
    return launch_train(tmp_path, name, 4, [*RUN, *TP2_DP2], env)


def losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir / "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
def test_kill_during_a_save_and_resume_bit_exact_on_tp2_dp2(tmp_path: Path) -> None:
    """TP 2 x DP 2, 8 steps straight == stopped by signals during the step-4 save (a second
    signal arriving mid-save) + killed (SIGKILL, one rank) in the middle of the step-6 save
    + resumed from step 4 to 8: the same losses, bit for bit."""
    straight = launch(tmp_path, "straight")
    assert finish_launch(straight) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    run = tmp_path / "run"
    ckpts = run / "checkpoints"

    # 1) Stop signals while the step-4 save is in progress: the save completes, the run
    #    stops after it (exit 75 on every rank).
    marker = tmp_path / "pause4"
    proc = launch(tmp_path, "run", {"SEQBOAT_CHECKPOINT_PAUSE": f"4:{marker}"})
    pids = []
    try:
        pids = paused_ranks(marker, 4)
        os.kill(pids[0], signal.SIGUSR1)
        os.kill(pids[3], signal.SIGTERM)
        os.kill(pids[0], signal.SIGTERM)  # a second one, on a rank already stopping
        time.sleep(0.5)
        marker.touch()
    finally:
        finish_launch(proc, pids)
    log = (tmp_path / "run.log").read_text()
    assert "stopped on request at step 4" in log, log[-3000:]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    load_checkpoint(ckpts / "step_00000004")  # every checksum verifies

    # 2) SIGKILL one rank in the middle of the step-6 save: step 4 stays the latest.
    marker = tmp_path / "pause6"
    proc = launch(tmp_path, "run", {"SEQBOAT_CHECKPOINT_PAUSE": f"6:{marker}"})
    pids, code = [], None
    try:
        pids = paused_ranks(marker, 4)
        os.kill(pids[1], signal.SIGKILL)
        marker.touch()  # the others go on, and fail at the barrier
    finally:
        code = finish_launch(proc, pids)
    assert code != 0
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert (ckpts / "step_00000006.tmp").is_dir()  # the partial save, never published
    assert not (ckpts / "step_00000006").exists()

    # 3) The next run resumes from step 4, cleans the partial save up, and follows the
    #    straight run bit for bit.
    proc = launch(tmp_path, "run")
    assert finish_launch(proc) == 0, (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    assert "resuming" in log and "from step_00000004" in log
    assert not (ckpts / "step_00000006.tmp").exists()
    a, b = losses(tmp_path / "straight"), losses(run)
    assert list(a) == list(b) == list(range(1, 9))
    assert a == b  # bit for bit


def test_data_parallel_copies_share_the_writing(results) -> None:
    """The DP4 phase spread its writes: every rank wrote a fair part; TP2 x DP2 (not spread)
    left DP copy 1 (ranks 2, 3) nothing to write."""
    checkpoints = results[1] / "checkpoints"

    def sizes(step: int) -> list[int]:
        folder = checkpoints / f"step_{step:08d}" / "model"
        return [(folder / f"__{r}_0.distcp").stat().st_size for r in range(WORLD)]

    spread, first = sizes(2), sizes(1)
    assert min(spread) > 0.15 * sum(spread), spread
    assert max(first[2:]) < 0.01 * sum(first), first
