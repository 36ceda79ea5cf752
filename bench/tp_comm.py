"""Bytes each tensor-parallel collective moves per SeqBoat layer per step, beside the theory,
and the per-step time, for TP = 1, 2, 4 with and without sequence parallelism (gloo, CPU).

The collectives are counted by wrapping ``torch.distributed``'s functions (megatron-core's
mappings call them through the module, so every call is seen). "Bytes" is the payload of the
collective on one rank: the tensor of an all-reduce or broadcast, the gathered output of an
all-gather, the input of a reduce-scatter.

    python bench/tp_comm.py                 # L=2048, B=2, D=256, ~1-2 min on 2 cores
    python bench/tp_comm.py --length 4096 --act-bias 0.5
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ZDIM = 64
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


def theory(length: int, batch: int, width: int, compressed: int, zdim: int, sp: bool) -> dict:
    """Payload bytes per rank for one layer, forward + backward (fp32), by collective."""
    lbd, mbd = length * batch * width, compressed * batch * width
    out = collections.Counter()
    if sp:
        out["all_gather_into_tensor"] += lbd  # gather the normed input (fwd)
        out["reduce_scatter_tensor"] += lbd  # ... its gradient (bwd)
        out["reduce_scatter_tensor"] += length * batch * (width + 2)  # hx/router proj (fwd)
        out["all_gather_into_tensor"] += length * batch * (width + 2)  # ... gradient (bwd)
        out["all_gather_into_tensor"] += length * batch * 2  # routing logits (fwd)
        out["all_gather_into_tensor"] += lbd  # gated GAU output's gradient (bwd)
    else:
        out["all_reduce"] += lbd  # normed input's gradient (bwd)
        out["all_reduce"] += length * batch * (width + 2)  # hx/router proj (fwd)
    out["all_gather_into_tensor"] += mbd  # compressed tokens' channels (fwd)
    out["all_reduce"] += 2 * mbd  # input gradients of the r and v projections (bwd)
    out["all_reduce"] += compressed * batch * zdim  # gradient of the shared z (bwd)
    out["all_reduce"] += mbd  # GAU output projection (fwd)
    counts = {k: 4 * v for k, v in out.items()}
    counts["broadcast"] = length * batch  # the routing decision, one byte per token
    return counts


def ring_wire(payload: dict[str, int], size: int) -> float:
    """MiB each rank sends with ring algorithms: an all-reduce sends 2(p-1)/p of its tensor,
    an all-gather or reduce-scatter (p-1)/p of the full tensor."""
    factor = {"all_reduce": 2 * (size - 1) / size}
    return sum(v * factor.get(k, (size - 1) / size) for k, v in payload.items()) / 2**20


def worker(rank: int, world: int, args: dict) -> dict:
    warnings.simplefilter("ignore")  # megatron-core's notes about Apex / TE / CUDA on CPU
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel import cpu_compat
    from parallel.dims import ParallelDims
    from parallel.tensor import shard_state_dict
    from pretrain.config import ModelConfig
    from pretrain.model.layer import SeqBoatLayer

    cpu_compat.install()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp = ParallelDims.from_parallel_state(sequence_parallel=args["sp"]).tensor
    cfg = ModelConfig(
        width=args["width"], zdim=ZDIM, hdim=2 * args["width"], window=args["window"],
        act_bias=args["act_bias"],
    )  # fmt: skip
    torch.manual_seed(0)
    full = SeqBoatLayer(cfg)
    layer = SeqBoatLayer(cfg, tp) if tp.active else full
    if tp.active:
        layer.load_state_dict(shard_state_dict(full.state_dict(), layer, tp))
    x = torch.randn(args["length"], args["batch"], args["width"])
    if tp.sequence_parallel:
        x = x.chunk(tp.size, 0)[tp.rank].contiguous()
    x.requires_grad_(True)

    counted: collections.Counter = collections.Counter()
    # megatron-core binds its all-gather / reduce-scatter functions at import time, in
    # mappings.py and layers.py: wrap those bindings as well as torch.distributed's names.
    from megatron.core.tensor_parallel import layers, mappings

    targets = [(dist, name, name) for name in COLLECTIVES] + [
        (module, binding, kind)
        for module in (mappings, layers)
        for binding, kind in (
            ("dist_all_gather_func", "all_gather_into_tensor"),
            ("dist_reduce_scatter_func", "reduce_scatter_tensor"),
        )
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in targets]

    def counting(fn, kind: str):
        def call(*a, **kw):
            # all-gather: the gathered output (a[0]); reduce-scatter: its input (a[1]).
            tensor = a[1] if kind == "reduce_scatter_tensor" else a[0]
            counted[kind] += tensor.numel() * tensor.element_size()
            return fn(*a, **kw)

        return call

    def step(count: bool) -> tuple[float, float]:
        if count:
            for (module, name, fn), (_, _, kind) in zip(originals, targets, strict=True):
                setattr(module, name, counting(fn, kind))
        start = time.perf_counter()
        y, stats = layer(x, collect_stats=True)
        y.pow(2).mean().backward()
        elapsed = time.perf_counter() - start
        for module, name, fn in originals:
            setattr(module, name, fn)
        return elapsed, float(stats.activated.double().mean())

    step(count=False)  # warm-up
    _, ratio = step(count=True)
    times = [step(count=False)[0] for _ in range(args["repeats"])]
    compressed = 0
    with torch.no_grad():  # M: the largest activated count of the batch
        _, stats = layer(x.detach(), collect_stats=True)
        compressed = int(stats.activated.sum(0).max())
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return {"bytes": dict(counted), "time": min(times), "ratio": ratio, "M": compressed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--act-bias", type=float, default=0.0, help="> 0 activates fewer tokens")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from testing.local import run_ranks

    print(
        f"one SeqBoat layer, L={args.length}, B={args.batch}, D={args.width}, H={2 * args.width}, "
        f"Z={ZDIM}, window={args.window}; fp32 on CPU/gloo; bytes per rank, forward + backward"
    )
    header = f"{'run':>10} | {'collective':>22} | {'measured MiB':>12} | {'theory MiB':>10}"
    print(f"{header} | {'step s':>7} | act")
    for tp, sp in [(1, False), (2, False), (2, True), (4, False), (4, True)]:
        setting = {**vars(args), "sp": sp}
        result = run_ranks(worker, tp, setting, timeout=600)[0]
        expected = (
            theory(args.length, args.batch, args.width, result["M"], ZDIM, sp) if tp > 1 else {}
        )
        name = f"TP={tp}{'+SP' if sp else ''}"
        rows = sorted(set(result["bytes"]) | set(expected)) or ["(none)"]
        for i, key in enumerate(rows):
            measured = result["bytes"].get(key, 0) / 2**20
            predicted = expected.get(key, 0) / 2**20
            tail = f" | {result['time']:>7.3f} | {result['ratio']:.2f}" if i == 0 else ""
            label = name if i == 0 else ""
            print(f"{label:>10} | {key:>22} | {measured:>12.3f} | {predicted:>10.3f}{tail}")
        total = sum(result["bytes"].values()) / 2**20
        print(
            f"{'':>10} | {'total':>22} | {total:>12.3f} | {sum(expected.values()) / 2**20:>10.3f}"
        )
        print(
            f"{'':>10} | {'ring wire bytes, MiB':>22} | {ring_wire(result['bytes'], tp):>12.3f} |"
        )


if __name__ == "__main__":
    main()
