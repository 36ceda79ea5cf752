"""``seqboat plan``: the per-rank estimate against measured peak memory, and bad input.

Each configuration runs two training steps (the real step: ``train_step_for``, with the
optimizer or DeepSpeed's ZeRO engine) in fresh spawned gloo processes per configuration
(one-process configurations two at a time); each rank measures its resident memory's
peak above what it held before building the model (``testing/peak_memory.py``). What is
not the run's data is kept out of the measurement: megatron-core's lazily imported modules
are imported and the executable pages of the loaded libraries mapped before it starts, and
glibc's mmap threshold is 64 KiB, so freed tensors leave the resident set at once. The
planner's estimate for the same layout (``device="cpu"``) must be within 15% of the busiest
rank's measurement, for every configuration. The table is printed.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testing.local import free_ports, run_ranks

BASE = [
    "data.tokenizer.kind=byte", "model.layers=4", "model.vocab_multiple=64",
    "train.precision=fp32", "optimizer.warmup_steps=1",
    "model.act_bias=-10000.0",  # every token activated: the planner's default ratio 1.0
]  # fmt: skip
# Activation-heavy: long sequences, narrow model.
LONG = [
    *BASE, "model.width=128", "model.hdim=256", "model.zdim=32", "model.window=128",
    "train.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=2",
]  # fmt: skip
# Parameter-heavy: short sequences, wide model (optimizer state and ZeRO matter).
WIDE = [
    *BASE, "model.width=768", "model.hdim=1536", "model.zdim=64", "model.window=64",
    "train.seq_length=256", "train.micro_batch_size=2", "train.global_batch_size=8",
]  # fmt: skip

# (name, world, overrides)
CASES = [
    ("1 rank, none, L=4K", 1, LONG),
    ("1 rank, layer, L=4K", 1, [*LONG, "train.recompute=layer"]),
    ("1 rank, gau, L=8K", 1, [*LONG, "train.recompute=gau", "train.seq_length=8192"]),
    ("TP2+SP, none, L=4K", 2, [*LONG, "parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("PP2, layer, L=4K", 2, [*LONG, "parallel.pipeline=2", "train.recompute=layer"]),
    ("DP2 ZeRO-0, wide", 2, WIDE),
    ("DP2 ZeRO-2, wide", 2, [*WIDE, "optimizer.zero_stage=2"]),
]
TOLERANCE = 0.15


def map_code_pages() -> None:
    """Maps every page of the executable file mappings (libtorch's kernels, ...) into this
    process: a kernel's code, paged in on its first call, is resident memory (up to ~20 MiB
    in a first training step) but not the run's data, and no GPU allocator counts it."""
    page = 4096
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) < 6 or "x" not in fields[1] or "r" not in fields[1]:
            continue
        if not fields[5].startswith("/"):
            continue
        start, end = (int(a, 16) for a in fields[0].split("-"))
        for address in range(start, end, page):
            ctypes.c_char.from_address(address).value  # noqa: B018 (the read maps the page)


def measure_worker(rank: int, world: int, overrides: list[str]) -> int:
    """One rank: peak resident bytes of building the model and two training steps."""
    from parallel.topology import shutdown
    from parallel.world import detect_world
    from pretrain import build
    from pretrain.config import load_config
    from pretrain.model.lm import StageChunks
    from pretrain.model.recompute import set_recompute
    from pretrain.plan import vocab_size_of
    from pretrain.rng import seed_dropout_streams, seed_everything
    from pretrain.steps import train_step_for
    from testing.peak_memory import peak_growth

    cfg = load_config(None, overrides)
    dims = build.parallel_dims_for(cfg, detect_world())
    # Imports are not the run's memory: megatron-core's modules, which the model and the
    # step import on first use (with sympy: ~80 MiB on one rank), and DeepSpeed.
    importlib.import_module("megatron.core.tensor_parallel")
    importlib.import_module("megatron.core.pipeline_parallel.schedules")
    if cfg.optimizer.zero_stage:
        from parallel.deepspeed_compat import import_deepspeed

        import_deepspeed()
    place = build.pipeline_place_for(cfg, dims)
    seed_everything(cfg.train.seed)
    vocab = vocab_size_of(cfg)
    t = cfg.train
    tokens = torch.randint(0, vocab, (t.global_batch_size, t.seq_length + 1))
    rows = t.global_batch_size // dims.dp_size
    batch = tokens[dims.dp_rank * rows : (dims.dp_rank + 1) * rows]
    map_code_pages()
    with peak_growth() as peak:
        chunks = build.model_chunks_for(cfg, vocab, dims.device, dims, place)
        model = chunks[0] if len(chunks) == 1 else StageChunks(chunks)
        set_recompute(model, t.recompute)
        seed_dropout_streams(t.seed, dims)
        optimizer = build.optimizer_for(model, cfg.optimizer)
        scheduler = build.scheduler_for(optimizer, cfg.optimizer, t.max_steps)
        zero = None
        if cfg.optimizer.zero_stage:
            zero = build.zero_engine_for(cfg, dims, chunks, model, optimizer, scheduler)
        step = train_step_for(cfg, dims, place, chunks, model, optimizer, scheduler, zero)
        for _ in range(2):
            step(batch, collect_stats=False)
    shutdown()
    return peak.bytes


def _measure_alone(rank: int, world: int, cases: list[list[str]], ports: list[int]) -> int:
    """Process ``rank`` measures ``cases[rank]`` as a one-process run of its own (its own
    port, should it create a group)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_PORT=str(ports[rank]))
    return measure_worker(0, 1, cases[rank])


def measure_many(world: int, cases: list[list[str]]) -> list[list[int]]:
    """Per configuration, each rank's peak bytes. Every configuration gets fresh processes
    (a process that ran one keeps heap and library state that lowers the next one's peak
    by ~15 MiB); one-process configurations run two at a time, as one spawn of two."""
    # Freed tensors return to the OS at once (else glibc's heap may keep them resident).
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**16)
    try:
        if world > 1:
            return [run_ranks(measure_worker, world, case, timeout=600) for case in cases]
        out: list[list[int]] = []
        for i in range(0, len(cases), 2):
            pair = cases[i : i + 2]
            peaks = run_ranks(_measure_alone, len(pair), pair, free_ports(2), timeout=600)
            out += [[peak] for peak in peaks]
        return out
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def measure(world: int, overrides: list[str]) -> list[int]:
    return measure_many(world, [overrides])[0]


def planned(world: int, overrides: list[str]) -> float:
    from pretrain.config import load_config
    from pretrain.plan import estimate, layout_of

    cfg = load_config(None, overrides)
    return estimate(cfg, layout_of(cfg, world), ratio=1.0, device="cpu").total


def accuracy_table(cases: list[tuple[str, int, list[str]]]) -> list[tuple]:
    """(name, per-rank measured bytes, planned bytes, error of the busiest rank) for each
    configuration."""
    rows = []
    for world in sorted({world for _, world, _ in cases}):
        mine = [(name, overrides) for name, w, overrides in cases if w == world]
        measured = measure_many(world, [overrides for _, overrides in mine])
        for (name, overrides), peaks in zip(mine, measured, strict=True):
            plan = planned(world, overrides)
            rows.append((name, peaks, plan, plan / max(peaks) - 1))
    order = [name for name, _, _ in cases]
    return sorted(rows, key=lambda row: order.index(row[0]))


def format_table(rows: list[tuple]) -> str:
    mib = 2**20
    lines = [f"{'configuration':<22}{'planned MiB':>12}  {'measured MiB per rank':<24}"
             f"{'error per rank':<20}"]  # fmt: skip
    for name, peaks, plan, _ in rows:
        measured = "/".join(f"{p / mib:.0f}" for p in peaks)
        errors = "/".join(f"{plan / p - 1:+.1%}" for p in peaks)
        lines.append(f"{name:<22}{plan / mib:>12.0f}  {measured:<24}{errors:<20}")
    return "\n".join(lines)


@pytest.mark.slow
def test_planner_within_15_percent_of_measured_peak() -> None:
    """The issue's goal: every configuration's estimate within 15% of the busiest rank's
    measured peak (RSS growth of two real training steps on CPU)."""
    rows = accuracy_table(CASES)
    print("\n" + format_table(rows))
    off = [(name, f"{error:+.1%}") for name, _, _, error in rows if abs(error) > TOLERANCE]
    assert not off, f"estimates more than {TOLERANCE:.0%} off the measured peak: {off}"


# --------------------------------------------------------------------------- units, CLI


def test_parse_memory() -> None:
    from pretrain.config import ConfigError
    from pretrain.plan import parse_memory

    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("81920MiB") == 80 * 2**30
    assert parse_memory("80G") == 80 * 2**30
    for bad in ("eighty", "80XB", "-1GiB", "0", ""):
        with pytest.raises(ConfigError):
            parse_memory(bad)


def test_layouts_and_recompute_order() -> None:
    """More recompute never needs more memory; ZeRO stages shard more and more; tensor
    parallelism divides the weights."""
    from dataclasses import replace

    from pretrain.config import load_config
    from pretrain.plan import Layout, estimate, parse_layout

    cfg = load_config("configs/350m.yaml")
    modes = ("none", "gau", "layer")
    totals = [estimate(cfg, Layout(dp=8, recompute=m)).activations for m in modes]
    assert totals[0] > totals[1] > totals[2]
    stages = [estimate(cfg, Layout(dp=8, zero=z)) for z in (0, 1, 2, 3)]
    assert [s.optimizer for s in stages][1:] == [stages[1].optimizer] * 3
    assert stages[0].optimizer > stages[1].optimizer
    assert stages[1].gradients > stages[2].gradients and stages[2].weights > stages[3].weights
    tp2 = estimate(cfg, Layout(tp=2, dp=4, sp=True))
    assert tp2.weights < 0.6 * stages[0].weights
    layout = parse_layout("tp=2,pp=4,zero=1,recompute=layer", cfg, 128)
    assert (layout.tp, layout.pp, layout.dp, layout.zero) == (2, 4, 16, 1)
    assert layout.recompute == "layer"
    sparse = estimate(cfg, Layout(dp=8), ratio=0.25).activations
    assert sparse < estimate(cfg, Layout(dp=8)).activations
    assert replace(cfg).train.recompute == "none"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain", "plan", *args], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_cli_plan_350m() -> None:
    out = run_cli("--config", "configs/350m.yaml", "--nodes", "16", "--gpus-per-node", "8",
                  "--gpu-memory", "80GiB", "train.seq_length=8192")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "activation ratio assumed: 1" in out.stdout
    assert "layouts fit" in out.stdout and "do not fit or cannot run" in out.stdout
    assert "weights" in out.stdout and "optimizer state" in out.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--gpu-memory", "eighty"),
        ("--gpu-memory", "80GiB", "--layout", "tp=3,bogus=1"),
        ("--gpu-memory", "80GiB", "--layout", "tp=3"),
        ("--gpu-memory", "80GiB", "--activation-ratio", "1.5"),
        ("--gpu-memory", "80GiB", "train.recompute=full"),
    ],
)
def test_cli_bad_input(args: tuple) -> None:
    out = run_cli("--config", "configs/350m.yaml", "--nodes", "1", "--gpus-per-node", "8", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqboat: error:"), out.stderr
