"""Sharded checkpoint save and load: seconds and bytes per rank, for the tiny config and
bigger shapes, on 1, 2 (TP 2 or DP 2) and optionally 4 (TP 2 x DP 2) gloo processes on CPU.

Each case builds the SeqBoat language model (fp32) with AdamW state (one step on random
gradients), then times the Trainer's ``Checkpointer``: ``save`` (model + optimizer through
dist_checkpointing, the per-rank file, checksums, publication) and ``restore`` (checksum
verification, the sharded load into the model and optimizer); the slowest rank's time is
reported, each part timed after a garbage collection (``settle``). Beside the synchronous
save, the same save with ``checkpoint.async``: the time training is blocked (staging: host
copies of the tensors, megatron's factories, the rank file) and the time until the
background writer has published it; ``--profile`` adds the parts of the blocked time
(``Checkpointer.timings``). The blocked time is the best of the repeats, which a save that
reuses the sharded state dict of the save before (``pretrain/host_staging.py``) gives;
"first" is the first async save's, which builds it (and may wait for the writer process to
be ready). What training loses to a save is more than the time it was
blocked: the writer competes for the CPU (and, were it a thread, for the GIL) while the next
steps run. So each case also times the training steps (forward, backward, AdamW; one
sequence of ``--step-tokens``) right after a save, as many as cover the async writing time
(at least ``--steps``), against the same steps with no save in flight: "lost" is blocked
time + those steps' extra time, for the synchronous save and the async one. Bytes per rank:
the files a rank wrote (its shard file and its ``rank_XXXXX.pt``; rank 0 also the shared
metadata). With 1 rank, also one process without a process group ("no group": ``seqboat
train`` on one process).

    python bench/checkpoint_io.py               # tiny + big, 1 and 2 ranks
    python bench/checkpoint_io.py --world 1 2 4 --shapes tiny 125m --repeats 3 --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 2048
SHAPES = {
    "tiny": {},  # configs/tiny.yaml: 4 layers, D=128
    "big": {"layers": 8, "width": 512, "zdim": 128, "hdim": 1024},
    "125m": {"layers": 24, "width": 768, "zdim": 128, "hdim": 1536},  # configs/125m.yaml
}
LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(2, 2)]}  # world -> (tp, dp)


def build(shape: str, tp_size: int, grouped: bool = True):
    """(model, its synchronous and its background Checkpointer) on this rank, Adam state
    filled; ``grouped=False``: one process without a process group (``seqboat train`` on
    one process)."""
    import torch
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from pretrain.build import model_chunks_for, optimizer_for
    from pretrain.checkpointer import Checkpointer
    from pretrain.config import load_config

    parallel_state.destroy_model_parallel()
    if grouped:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    dims = ParallelDims.from_parallel_state() if grouped else ParallelDims.single()
    cfg = load_config(None, [])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **SHAPES[shape]))
    torch.manual_seed(0)
    (model,) = model_chunks_for(cfg, VOCAB, torch.device("cpu"), dims)
    optimizer = optimizer_for(model, cfg.optimizer)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    background = Checkpointer(model, optimizer, dims, background=True)
    return model, Checkpointer(model, optimizer, dims), background


def training_steps(model, tokens: int):
    """A function running n training steps of ``model`` (one sequence of ``tokens`` random
    ids each, its own AdamW: the checkpointed optimizer's state is left alone)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))

    def run(steps: int) -> None:
        for _ in range(steps):
            logits, _ = model(ids)
            logits.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    shape: str, tp_size: int, repeats: int, root: Path, steps: int, tokens: int,
    grouped: bool = True,
) -> dict:  # fmt: skip
    import torch.distributed as dist

    model, checkpointer, background = build(shape, tp_size, grouped)
    world = dist.get_world_size() if grouped else 0
    run_dir = root / f"{shape}-tp{tp_size}-w{world}"
    train = training_steps(model, tokens)
    train(1)  # warm-up
    one_step = slowest(timed(lambda: train(1)))
    saves, loads, blocked, published, parts = [], [], [], [], []
    alone, lost_sync, lost_async = [], [], []
    for step in range(1, repeats + 1):
        settle()
        start = time.perf_counter()
        checkpointer.save(run_dir, 4 * step - 3, {}, keep_last=1)  # steps in order: see _prune
        saves.append(slowest(time.perf_counter() - start))
        settle()
        start = time.perf_counter()
        checkpointer.restore(run_dir)
        loads.append(slowest(time.perf_counter() - start))
        settle()
        start = time.perf_counter()
        background.save(run_dir, 4 * step - 2, {}, keep_last=1)
        blocked.append(slowest(time.perf_counter() - start))
        parts.append({k: slowest(v) for k, v in background.timings.items()})
        background.wait()
        published.append(slowest(time.perf_counter() - start))
        if steps:  # the steps alone, then after each kind of save
            n = max(steps, math.ceil(published[-1] / one_step))  # every rank's the same
            settle()
            alone.append(slowest(timed(lambda: train(n))))  # noqa: B023 (called at once)
            for saver, lost, number in ((checkpointer, lost_sync, 4 * step - 1),
                                        (background, lost_async, 4 * step)):  # fmt: skip
                settle()
                start = time.perf_counter()
                saver.save(run_dir, number, {}, keep_last=1)
                train(n)
                lost.append(slowest(time.perf_counter() - start) - alone[-1])
                background.wait()
    background.close()
    ckpt = run_dir / "checkpoints" / f"step_{4 * repeats - (0 if steps else 2):08d}"  # async
    params = sum(p.numel() for p in model.parameters())
    return {
        "save_s": min(saves), "load_s": min(loads), "bytes": owned_bytes(ckpt),
        "local_params": params, "blocked_s": min(blocked), "published_s": min(published),
        "first_blocked_s": blocked[0],
        "parts": parts[blocked.index(min(blocked))],  # of the least blocked async save
        "first_parts": parts[0],
        "steps_s": min(alone, default=0.0), "steps": n if steps else 0,
        "lost_sync_s": _median(lost_sync), "lost_async_s": _median(lost_async),
    }  # fmt: skip


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def settle() -> None:
    """Before a timed part: Python's garbage collected (a full collection of this process's
    heap, triggered by the previous part's objects, takes ~25 ms and would land in whichever
    part came next) and every rank at the start."""
    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.barrier()


def slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def owned_bytes(ckpt: Path) -> list[int]:
    """Bytes of the files each rank wrote (unowned files count for rank 0)."""
    import torch.distributed as dist

    out = [0] * (dist.get_world_size() if dist.is_initialized() else 1)
    for path in ckpt.rglob("*"):
        if path.is_file():
            match = re.search(r"rank_(\d+)\.pt$|__(\d+)_\d+\.distcp$", path.name)
            out[int(match.group(1) or match.group(2)) if match else 0] += path.stat().st_size
    return out


def worker(
    rank: int, world: int, repeats: int, root: str, shapes: list[str], steps: int, tokens: int
) -> list[dict]:
    warnings.simplefilter("ignore")  # megatron-core's notes about Apex / TE / CUDA on CPU
    from testing.local import gloo_world

    results = []
    with gloo_world(rank, world):
        for shape in shapes:
            for tp_size, dp_size in LAYOUTS[world]:
                result = measure(shape, tp_size, repeats, Path(root), steps, tokens)
                layout = {"world": world, "tp": tp_size, "dp": dp_size}
                results.append({"shape": shape, **layout, **result})
    if world == 1:  # and as one process without a process group, like `seqboat train`
        for shape in shapes:
            result = measure(shape, 1, repeats, Path(root), steps, tokens, grouped=False)
            results.append({"shape": shape, "world": 1, "tp": 0, "dp": 0, **result})
    return results


def layout_name(row: dict) -> str:
    return f"TP{row['tp']}xDP{row['dp']}" if row["tp"] else "no group"


def main() -> None:
    from testing.local import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], choices=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="best of N save+load")
    parser.add_argument("--shapes", nargs="+", default=["tiny", "big"], choices=list(SHAPES))
    parser.add_argument(
        "--profile", action="store_true", help="also the parts of the async blocked time"
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="training steps timed after a save (0: none)"
    )
    parser.add_argument("--step-tokens", type=int, default=128, help="tokens per step")
    args = parser.parse_args()
    print(f"fp32 model + AdamW state, CPU/gloo, best of {args.repeats}; slowest rank's time")
    print("async blocked: training blocked by a checkpoint.async save; published: until the")
    print("background writer has published it; ratio: async blocked / synchronous save;")
    print("first: the blocked time of the first async save (it builds the sharded state dict")
    print("that later saves of the same layout reuse, and waits for the writer to be ready)")
    header = (
        f"{'shape':>5} | {'ranks':>5} | {'layout':>9} | {'params/rank':>11} | {'save s':>7} | "
        f"{'load s':>7} | {'async blocked s':>15} | {'ratio':>5} | {'first s':>7} | "
        f"{'published s':>11} | "
        f"{'MiB per rank':>24} | {'MiB total':>9}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as root:
        rows = []
        for world in args.world:
            rows.extend(
                run_ranks(
                    worker, world, args.repeats, root, args.shapes, args.steps, args.step_tokens,
                    timeout=3600,
                )[0]
            )  # fmt: skip
    for r in sorted(rows, key=lambda r: (list(SHAPES).index(r["shape"]), r["world"])):
        per_rank = " ".join(f"{b / 2**20:.2f}" for b in r["bytes"])
        layout = layout_name(r)
        print(
            f"{r['shape']:>5} | {r['world']:>5} | {layout:>9} | "
            f"{r['local_params'] / 1e6:>10.2f}M | {r['save_s']:>7.3f} | {r['load_s']:>7.3f} | "
            f"{r['blocked_s']:>15.3f} | {r['blocked_s'] / r['save_s']:>5.2f} | "
            f"{r['first_blocked_s']:>7.3f} | {r['published_s']:>11.3f} | {per_rank:>24} | "
            f"{sum(r['bytes']) / 2**20:>9.2f}"
        )
    if args.steps:
        print_lost(rows, args.steps, args.step_tokens)
    if args.profile:
        print_parts(rows)
        print_parts(rows, "first_parts")


def print_lost(rows: list[dict], steps: int, tokens: int) -> None:
    """Training time lost to a save: blocked + the extra time of the next steps (median of
    the repeats), for each kind of save; ratio: async lost / sync lost."""
    print(
        f"\ntraining time lost to a save: blocked + extra time of the n steps after it "
        f"(n >= {steps}: covering the async write; {tokens} tokens each) against the same "
        "steps alone; median of the repeats"
    )
    header = (
        f"{'shape':>5} | {'ranks':>5} | {'layout':>9} | {'n':>3} | {'steps alone s':>13} | "
        f"{'sync lost s':>11} | {'async lost s':>12} | {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (list(SHAPES).index(r["shape"]), r["world"])):
        print(
            f"{r['shape']:>5} | {r['world']:>5} | {layout_name(r):>9} | {r['steps']:>3} | "
            f"{r['steps_s']:>13.3f} | "
            f"{r['lost_sync_s']:>11.3f} | {r['lost_async_s']:>12.3f} | "
            f"{r['lost_async_s'] / r['lost_sync_s']:>5.2f}"
        )


def print_parts(rows: list[dict], which: str = "parts") -> None:
    """The parts of the least blocked async save (``first_parts``: of the first), in ms
    (slowest rank per part, so they need not add up to the total): Checkpointer.timings."""
    title = "the first async save's" if which == "first_parts" else "async"
    print(f"\n{title} blocked time by part, ms (slowest rank each; Checkpointer.timings)")
    keys = list(dict.fromkeys(k for r in rows for k in r[which]))
    header = f"{'shape':>5} | {'ranks':>5} | {'layout':>9} | " + " | ".join(
        f"{k:>13}" for k in keys
    )
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (list(SHAPES).index(r["shape"]), r["world"])):
        cells = " | ".join(
            f"{r[which][k] * 1e3:>13.1f}" if k in r[which] else f"{'-':>13}" for k in keys
        )
        layout = layout_name(r)
        print(f"{r['shape']:>5} | {r['world']:>5} | {layout:>9} | {cells}")


if __name__ == "__main__":
    main()
