"""Pipeline bubble of megatron-core's 1F1B schedule (``parallel.pipeline.pipeline_step``)
for P = 2 and 4 stages and m = 1, 2, 4, 8 micro-batches, beside the theory (P-1)/(m+P-1).

Each stage is one artificial layer of fixed cost: its forward waits ``--forward-ms`` and its
backward twice that (``time.sleep`` by default, so that 4 ranks on 2 cores do not compete for
the CPU and the table shows the schedule, not the machine; ``--spin`` busy-waits instead,
which is faithful only with no more ranks than free cores). Activations of [4, 1, 8] floats
cross the stages over gloo. Per rank, "busy" is the time spent inside the layer's forward and
backward; the step's wall time is the slowest rank's, from a barrier to the end of
``pipeline_step``; bubble = 1 - busy / wall, averaged over the ranks (in theory every rank
idles (P-1) x (forward + backward) of a step of (m+P-1) x (forward + backward)). The
median over ``--repeats`` steps after one warm-up step is printed; the excess over the
theory is the p2p and Python overhead per micro-batch.

    python bench/pipeline_bubble.py                 # 1-2 min on 2 cores, mostly imports
    python bench/pipeline_bubble.py --forward-ms 5 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ, MICRO, HIDDEN = 4, 1, 8


def _layer_cls():
    import torch

    class FixedCost(torch.autograd.Function):
        """Identity whose forward and backward take a fixed time, recorded as busy."""

        busy = 0.0
        forward_s = 0.01
        spin = False

        @staticmethod
        def wait(seconds: float) -> None:
            start = time.perf_counter()
            if FixedCost.spin:
                while time.perf_counter() - start < seconds:
                    pass
            else:
                time.sleep(seconds)
            FixedCost.busy += time.perf_counter() - start

        @staticmethod
        def forward(ctx, x):
            FixedCost.wait(FixedCost.forward_s)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            FixedCost.wait(2 * FixedCost.forward_s)
            return grad

    return FixedCost


def _stage_cls(fixed_cost):
    import torch
    from torch import nn

    class Stage(nn.Module):
        """One pipeline stage: a small linear map behind a fixed-cost layer."""

        def __init__(self, first: bool, last: bool) -> None:
            super().__init__()
            self.first, self.last = first, last
            self.weight = nn.Parameter(torch.eye(HIDDEN))
            self.input_tensor = None

        def set_input_tensor(self, tensor) -> None:
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

        def forward(self, batch):
            x = batch if self.first else self.input_tensor
            y = fixed_cost.apply(x @ self.weight)
            return y.pow(2).mean() if self.last else y

    return Stage


def worker(rank: int, world: int, micro_batches: list[int], forward_ms: float, spin: bool,
           repeats: int) -> list[dict]:  # fmt: skip
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel.pipeline import PipelinePlace, pipeline_step
    from testing.local import gloo_world

    fixed_cost = _layer_cls()
    fixed_cost.forward_s, fixed_cost.spin = forward_ms / 1000, spin
    rows = []
    with gloo_world(rank, world):
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world)
        place = PipelinePlace.build(world, world, dist.get_rank())
        stage = _stage_cls(fixed_cost)(place.is_first, place.is_last)
        for m in micro_batches:
            batches = [torch.randn(SEQ, MICRO, HIDDEN) for _ in range(m)]
            samples = []
            for i in range(repeats + 1):  # the first step warms up
                dist.barrier()
                fixed_cost.busy = 0.0
                start = time.perf_counter()
                pipeline_step(
                    [stage], place, batches, lambda chunk, batch: chunk(batch),
                    seq_length=SEQ, micro_batch_size=MICRO, hidden_size=HIDDEN,
                    dtype=torch.float32,
                )  # fmt: skip
                wall = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                bubble = torch.tensor(1 - fixed_cost.busy / float(wall), dtype=torch.float64)
                dist.all_reduce(bubble)
                if i:
                    samples.append((float(bubble) / world, float(wall)))
            bubble, wall = (statistics.median(s) for s in zip(*samples, strict=True))
            rows.append({"P": world, "m": m, "bubble": bubble, "wall": wall})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--spin", action="store_true", help="busy-wait instead of sleeping")
    args = parser.parse_args()

    from testing.local import run_ranks

    step_ms = 3 * args.forward_ms
    print(f"1F1B bubble, fixed cost per stage: forward {args.forward_ms:g} ms, backward "
          f"{2 * args.forward_ms:g} ms ({'spin' if args.spin else 'sleep'}); "
          f"median of {args.repeats} steps")  # fmt: skip
    print(f"{'P':>2} {'m':>3} {'theory':>8} {'measured':>9} {'step ms':>9} {'ideal ms':>9}")
    for p in args.stages:
        rows = run_ranks(
            worker, p, args.micro_batches, args.forward_ms, args.spin, args.repeats, timeout=900
        )[0]
        for row in rows:
            m = row["m"]
            theory = (p - 1) / (m + p - 1)
            print(
                f"{p:>2} {m:>3} {theory:>8.3f} {row['bubble']:>9.3f} "
                f"{1000 * row['wall']:>9.1f} {(m + p - 1) * step_ms:>9.1f}"
            )


if __name__ == "__main__":
    main()
