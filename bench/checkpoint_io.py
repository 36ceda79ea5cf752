"""Sharded checkpoint save and load: seconds and bytes per rank, for the tiny config and a
bigger shape, on 1, 2 (TP 2 or DP 2) and optionally 4 (TP 2 x DP 2) gloo processes on CPU.

Each case builds the SeqBoat language model (fp32) with AdamW state (one step on random
gradients), then times ``save_checkpoint`` (model + optimizer through dist_checkpointing,
the per-rank file, checksums, publication) and ``load_latest`` (checksum verification and
the sharded load) into freshly built modules; the slowest rank's time is reported. Bytes per
rank: the files a rank wrote (its shard file and its ``rank_XXXXX.pt``; rank 0 also the
shared metadata).

    python bench/checkpoint_io.py               # tiny + big, 1 and 2 ranks, ~2-3 min on 2 cores
    python bench/checkpoint_io.py --world 4 --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
import time
import warnings
from pathlib import Path

VOCAB = 2048
SHAPES = {
    "tiny": {},  # configs/tiny.yaml: 4 layers, D=128
    "big": {"layers": 8, "width": 512, "zdim": 128, "hdim": 1024},
}
LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(2, 2)]}  # world -> (tp, dp)


def build(shape: str, tp_size: int):
    """(model, optimizer, place, layout) on this rank, Adam state filled."""
    import torch
    from megatron.core import parallel_state

    from parallel.sharding import Place
    from parallel.tensor import TensorParallel, shard_state_dict
    from pretrain.build import optimizer_for
    from pretrain.checkpoint import Layout
    from pretrain.config import OptimizerConfig, load_config
    from pretrain.model.lm import LanguageModel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    tp = TensorParallel.from_parallel_state()
    cfg = dataclasses.replace(load_config(None, []).model, **SHAPES[shape])
    torch.manual_seed(0)
    model = LanguageModel(cfg, VOCAB)
    if tp.active:
        full = model.state_dict()
        model = LanguageModel(cfg, VOCAB, tp)
        model.load_state_dict(shard_state_dict(full, model, tp))
    optimizer = optimizer_for(model, OptimizerConfig())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    layout = Layout(tp.rank, tp.size, 0, 1, dp_rank, dp_size)
    return model, optimizer, Place(tp.rank, tp.size, dp_rank, dp_size), layout


def measure(shape: str, tp_size: int, repeats: int, root: Path) -> dict:
    import torch.distributed as dist

    from parallel.sharding import (
        load_model,
        load_optimizer,
        model_sharded_state_dict,
        optimizer_record,
        optimizer_sharded_state_dict,
        spread_writes,
    )
    from pretrain.checkpoint import load_latest, save_checkpoint

    model, optimizer, place, layout = build(shape, tp_size)
    run_dir = root / f"{shape}-tp{tp_size}-w{dist.get_world_size()}"
    saves, loads = [], []
    for step in range(1, repeats + 1):
        sharded = spread_writes(
            {
                **model_sharded_state_dict(model, place),
                **optimizer_sharded_state_dict(optimizer, model, place),
            },
            place,
        )
        record = {"optimizer": optimizer_record(optimizer, model)}
        dist.barrier()
        start = time.perf_counter()
        save_checkpoint(run_dir, step, record, keep_last=1, layout=layout, sharded=sharded)
        saves.append(slowest(time.perf_counter() - start))

        def template(state: dict) -> dict:
            return {
                **model_sharded_state_dict(model, place, template=True),
                **optimizer_sharded_state_dict(optimizer, model, place, state["optimizer"]),
            }

        dist.barrier()
        start = time.perf_counter()
        state, _ = load_latest(run_dir, layout, template)
        load_model(model, state["sharded"])
        load_optimizer(optimizer, model, state["optimizer"], state["sharded"])
        loads.append(slowest(time.perf_counter() - start))
    ckpt = run_dir / "checkpoints" / f"step_{repeats:08d}"
    params = sum(p.numel() for p in model.parameters())
    return {
        "save_s": min(saves), "load_s": min(loads), "bytes": owned_bytes(ckpt),
        "local_params": params,
    }  # fmt: skip


def slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def owned_bytes(ckpt: Path) -> list[int]:
    """Bytes of the files each rank wrote (unowned files count for rank 0)."""
    import torch.distributed as dist

    out = [0] * dist.get_world_size()
    for path in ckpt.rglob("*"):
        if path.is_file():
            match = re.search(r"rank_(\d+)\.pt$|__(\d+)_\d+\.distcp$", path.name)
            out[int(match.group(1) or match.group(2)) if match else 0] += path.stat().st_size
    return out


def worker(rank: int, world: int, repeats: int, root: str) -> list[dict]:
    warnings.simplefilter("ignore")  # megatron-core's notes about Apex / TE / CUDA on CPU
    from parallel.local import gloo_world

    results = []
    with gloo_world(rank, world):
        for shape in SHAPES:
            for tp_size, dp_size in LAYOUTS[world]:
                result = measure(shape, tp_size, repeats, Path(root))
                layout = {"world": world, "tp": tp_size, "dp": dp_size}
                results.append({"shape": shape, **layout, **result})
    return results


def main() -> None:
    from parallel.local import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], choices=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="best of N save+load")
    args = parser.parse_args()
    print(f"fp32 model + AdamW state, CPU/gloo, best of {args.repeats}; slowest rank's time")
    header = (
        f"{'shape':>5} | {'ranks':>5} | {'layout':>9} | {'params/rank':>11} | {'save s':>7} | "
        f"{'load s':>7} | {'MiB per rank':>24} | {'MiB total':>9}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as root:
        rows = []
        for world in args.world:
            rows.extend(run_ranks(worker, world, args.repeats, root, timeout=1800)[0])
    for r in sorted(rows, key=lambda r: (list(SHAPES).index(r["shape"]), r["world"])):
        per_rank = " ".join(f"{b / 2**20:.2f}" for b in r["bytes"])
        layout = f"TP{r['tp']}xDP{r['dp']}"
        print(
            f"{r['shape']:>5} | {r['world']:>5} | {layout:>9} | "
            f"{r['local_params'] / 1e6:>10.2f}M | {r['save_s']:>7.3f} | {r['load_s']:>7.3f} | "
            f"{per_rank:>24} | {sum(r['bytes']) / 2**20:>9.2f}"
        )


if __name__ == "__main__":
    main()
