"""Data-parallel gradient averaging after the backward vs overlapped with it, on gloo.

Per step of 2 micro-batches on each of N gloo processes (CPU), the time from the end of the
last backward to the optimizer step (what the step waits for gradients: the all-reduce
without overlap, what is left of it with) and the whole step, both ways, in one run.

    python bench/grad_overlap.py                     # 2 and 4 ranks, ~1 min on 2 cores
    python bench/grad_overlap.py --world 2 --width 512 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(dims, args: argparse.Namespace, overlap: bool) -> dict[str, float]:
    import torch

    from parallel.grads import finish_gradients
    from pretrain.build import model_chunks_for, optimizer_for, overlapped_reduce_for
    from pretrain.config import load_config

    cfg = load_config(
        None,
        [
            f"model.layers={args.layers}", f"model.width={args.width}",
            f"model.hdim={2 * args.width}", "model.window=64", "train.seq_length=256",
            f"parallel.overlap_grad_reduce={str(overlap).lower()}",
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    (model,) = model_chunks_for(cfg, 2048, torch.device("cpu"), dims)
    optimizer = optimizer_for(model, cfg.optimizer)
    reducer = overlapped_reduce_for(cfg, dims, model)
    waits, steps = [], []
    for step in range(args.steps + 1):  # the first is a warm-up
        torch.distributed.barrier()
        start = time.perf_counter()
        for micro in range(2):
            tokens = torch.randint(
                0, 2048, (2, 257), generator=torch.Generator().manual_seed(micro)
            )
            loss, _ = model.loss(tokens)
            if reducer is not None and micro == 1:
                reducer.arm()
            (loss / 2).backward()
        backward_done = time.perf_counter()
        finish_gradients([model], dims, 1.0, overlapped=reducer)
        ready = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            waits.append(ready - backward_done)
            steps.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return {"wait": statistics.median(waits), "step": statistics.median(steps), "params": params}


def worker(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    import warnings

    warnings.simplefilter("ignore")
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from testing.local import gloo_world

    with gloo_world(rank, world):
        parallel_state.initialize_model_parallel()
        dims = ParallelDims.from_parallel_state()
        return [measure(dims, args, overlap) for overlap in (False, True)]


def main() -> None:
    from testing.local import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="median of N steps")
    args = parser.parse_args()
    header = (
        f"{'ranks':>5} | {'params':>7} | {'wait after backward, ms':>24} | {'ratio':>5} | "
        f"{'step s':>13} | {'ratio':>5}"
    )
    print("gloo, CPU; per step: 2 micro-batches of 2 x 256 tokens; median over steps, rank 0")
    columns = f"{'one all-reduce  overlapped':>24} | {'':>5} | {'after  overl.':>13}"
    print(f"{'':>5} | {'':>7} | {columns} |")
    print(header)
    print("-" * len(header))
    for world in args.world:
        plain, overlapped = run_ranks(worker, world, args, timeout=900)[0]
        print(
            f"{world:>5} | {plain['params'] / 1e6:>6.2f}M | {plain['wait'] * 1e3:>14.1f} "
            f"{overlapped['wait'] * 1e3:>9.1f} | {overlapped['wait'] / plain['wait']:>5.2f} | "
            f"{plain['step']:>6.3f} {overlapped['step']:>6.3f} | "
            f"{overlapped['step'] / plain['step']:>5.2f}"
        )


if __name__ == "__main__":
    main()
