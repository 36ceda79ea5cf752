"""``train.compile``: training steps of the tiny model (the embedded default config), eager
vs ``torch.compile(dynamic=True)``, in one run: the first step (compilation included), the
steady step time, and the graphs compiled (recompilations) over the run.

    python bench/compile_speed.py                 # ~2 min on 2 cores (compilation ~1 min)
    python bench/compile_speed.py --steps 60 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings


def run(compiled: bool, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from pretrain.config import load_config
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    cfg = load_config(None, [])
    model = LanguageModel(cfg.model, 2048)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.compile(model.loss, dynamic=True) if compiled else model.loss
    length = cfg.train.seq_length
    times = []
    for step in range(args.steps + 1):
        tokens = torch.randint(
            0, 2048, (args.batch, length + 1), generator=torch.Generator().manual_seed(step)
        )
        start = time.perf_counter()
        loss, _ = loss_fn(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    out = {"first": times[0], "steady": statistics.median(times[1:])}
    if compiled:
        from torch._dynamo.utils import counters

        out["graphs"] = counters["stats"]["unique_graphs"]
        out["breaks"] = sum(counters["graph_break"].values())
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import torch

    eager, compiled = run(False, args), run(True, args)
    header = f"tiny model, batch {args.batch} x 256 tokens, {args.steps} steps"
    print(f"{header}; torch {torch.__version__}, CPU")
    print(f"{'':>9} | {'first step s':>12} | {'steady ms':>9}")
    print(f"{'eager':>9} | {eager['first']:>12.2f} | {eager['steady'] * 1e3:>9.0f}")
    print(f"{'compiled':>9} | {compiled['first']:>12.2f} | {compiled['steady'] * 1e3:>9.0f}")
    print(
        f"steady compiled / eager: {compiled['steady'] / eager['steady']:.2f}; graphs compiled "
        f"over the run: {compiled['graphs']}, graph breaks: {compiled['breaks']}"
    )


if __name__ == "__main__":
    main()
