"""What the straggler report costs: one ``StragglerReport.gather`` (an all-gather of two
numbers per rank; host names once) on N gloo processes, against one training step of the
tiny config on one process, measured in one run.

    python bench/straggler_overhead.py            # 2 and 4 ranks, ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gather_cost(rank: int, world: int, calls: int) -> float:
    import torch.distributed as dist

    from parallel.dims import ParallelDims
    from parallel.world import World
    from pretrain.stragglers import StragglerReport
    from testing.local import gloo_world

    with gloo_world(rank, world):
        where = World(rank, world, rank, "127.0.0.1", 0, "torchrun")
        report = StragglerReport(ParallelDims(where, dp_size=world, dp_rank=rank), 1e9)
        report.gather(1.0, 0.0)  # host names, connections
        times = []
        for _ in range(calls):
            dist.barrier()
            start = time.perf_counter()
            report.gather(1.0, 0.0)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def tiny_step_s(steps: int) -> float:
    import tempfile

    from pretrain.config import load_config
    from pretrain.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"run.dir={tmp}/run", "wandb.mode=disabled",
                                 f"data.tokenizer.path={tmp}/tok.model"])  # fmt: skip
        trainer = Trainer(cfg, progress=False)
        trainer.train_step(collect_stats=False)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(collect_stats=False)
        return (time.perf_counter() - start) / steps


def main() -> None:
    from testing.local import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    step = tiny_step_s(args.steps)
    print(f"one step of the tiny config (1 process, CPU): {step * 1e3:.1f} ms")
    print(f"{'ranks':>5} | {'gather ms':>9} | {'per step at log_interval 10':>27}")
    for world in args.world:
        cost = run_ranks(gather_cost, world, args.calls, timeout=300)[0]
        print(f"{world:>5} | {cost * 1e3:>9.3f} | {cost / 10 / step:>26.4%}")


if __name__ == "__main__":
    main()
