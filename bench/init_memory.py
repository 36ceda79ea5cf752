"""Peak memory of one rank while it builds its model, before and after sharded initialization.

    python -m bench.init_memory [--config configs/1.3b.yaml] [--tp 1 2 4 8] [--all-ranks]

For each tensor-parallel size a gloo world of that many processes forms megatron-core's
groups, and rank 0 (every rank with ``--all-ranks``, one after another) builds its model in
two ways, each in a fresh process:

  before  the build until sharded initialization: the whole single-process model on every
          rank, then this rank's chunk loaded with its shard (``shard_state_dict``)
  after   ``pretrain.build.model_chunks_for``: the chunk built on the meta device, each
          parameter materialized from its own stream, only this rank's slice kept

The figure is the growth of the process's peak resident memory during the build
(testing/peak_memory.py), next to this rank's share: what it holds afterwards, and what it
would hold at most (its share + the largest full parameter). Without a pipeline every
tensor-parallel rank holds the same amount; the other ranks only join the groups. CPU only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from testing.local import run_ranks

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def load(config: str):
    from pretrain.config import config_from_dict, parse_yaml

    return config_from_dict(parse_yaml((ROOT / config).read_text()))


def replicated_build(cfg, vocab: int, dims) -> list:
    """The build before sharded initialization (pretrain/build.py ``model_chunks_for`` until
    then): the whole model materialized on every rank, cut into this rank's chunk."""
    from parallel.tensor import shard_state_dict
    from pretrain.model.lm import LanguageModel

    model = LanguageModel(cfg.model, vocab)
    if not dims.tensor.active:
        return [model]
    full = model.state_dict()
    chunk = LanguageModel(cfg.model, vocab, dims.tensor, dims.context)
    chunk.load_state_dict(shard_state_dict(full, chunk, dims.tensor))
    return [chunk]


def sharded_build(cfg, vocab: int, dims) -> list:
    from pretrain.build import model_chunks_for

    return model_chunks_for(cfg, vocab, torch.device("cpu"), dims)


def measure(rank: int, world: int, config: str, path: str, ranks: list[int]) -> dict | None:
    """This rank's peak growth building its model by ``path`` (when it is in ``ranks``; the
    ranks take turns, so that at most one build runs at a time)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from pretrain.rng import seed_everything
    from testing.local import gloo_world
    from testing.peak_memory import peak_growth

    build = {"before": replicated_build, "after": sharded_build}[path]
    cfg = load(config)
    vocab = cfg.data.tokenizer.vocab_size
    result = None
    with gloo_world(rank, world):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        dims = ParallelDims.from_parallel_state()
        small = load("configs/tiny.yaml")  # lazy imports and first-call allocations
        build(small, small.data.tokenizer.vocab_size, dims)
        for turn in ranks:
            if turn == rank:
                seed_everything(cfg.train.seed)
                start = time.perf_counter()
                with peak_growth() as peak:
                    chunks = build(cfg, vocab, dims)
                seconds = time.perf_counter() - start
                held = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
                result = {"rank": rank, "peak": peak.bytes, "held": held, "seconds": seconds}
                del chunks
            dist.barrier()
    return result


def model_sizes(config: str) -> tuple[int, int, int]:
    """(parameters, bytes, largest parameter's bytes) of the whole model, fp32, on meta."""
    from pretrain.model.lm import LanguageModel

    cfg = load(config)
    with torch.device("meta"):
        model = LanguageModel(cfg.model, cfg.data.tokenizer.vocab_size)
    numels = [p.numel() for p in model.parameters()]
    return sum(numels), 4 * sum(numels), 4 * max(numels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/1.3b.yaml")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--all-ranks", action="store_true", help="measure every rank")
    args = parser.parse_args()

    numel, full, largest = model_sizes(args.config)
    print(
        f"{args.config}: {numel / 1e6:.1f}M parameters, {full / MIB:.0f} MiB in fp32, largest "
        f"parameter {largest / MIB:.0f} MiB; peak resident growth of one rank while it "
        "builds its model (CPU, gloo ranks)\n"
    )
    header = (
        f"{'TP':>3} {'rank':>4} {'holds MiB':>10} {'before MiB':>11} {'after MiB':>10} "
        f"{'after/before':>12} {'bound MiB':>10} {'before s':>9} {'after s':>8}"
    )
    print(header)
    print("-" * len(header))
    for tp in args.tp:
        ranks = list(range(tp)) if args.all_ranks else [0]
        rows = {}
        for path in ("before", "after"):
            results = run_ranks(measure, tp, args.config, path, ranks, timeout=3600)
            rows[path] = {r["rank"]: r for r in results if r is not None}
        for rank in ranks:
            before, after = rows["before"][rank], rows["after"][rank]
            bound = after["held"] + largest  # its share + one full parameter
            print(
                f"{tp:>3} {rank:>4} {after['held'] / MIB:>10.0f} {before['peak'] / MIB:>11.0f} "
                f"{after['peak'] / MIB:>10.0f} {after['peak'] / before['peak']:>12.3f} "
                f"{bound / MIB:>10.0f} {before['seconds']:>9.1f} {after['seconds']:>8.1f}",
                flush=True,
            )
    print(
        "\nholds: this rank's parameters after the build; bound: holds + the largest full "
        "parameter (the most sharded initialization needs at once)"
    )


if __name__ == "__main__":
    main()
