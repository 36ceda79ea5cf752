"""Context parallelism (each sequence split into CP contiguous chunks), three tables from one run:

  1. bytes the sequence-parallel EMA scan (``parallel.scan.context_parallel_ema``) moves per
     layer, forward + backward, for growing L at CP = 4, beside the theory and beside what an
     all-gather of the activations would move;
  2. attention-work imbalance over the CP ranks (max / mean of ``parallel.dispatch``'s work
     items) before and after ``dispatch.balance``, for CP = 4 and 8: real text routed by a
     trained tiny model, an adversarial pattern (one rank holds every activated token) and
     uniform random activation;
  3. forward + backward time of a small SeqBoat language model for CP = 1, 2, 4 at the same
     total length (gloo on CPU).

Collectives are counted by wrapping ``torch.distributed``'s functions and megatron-core's
bindings of them (``dist_all_gather_func`` / ``dist_reduce_scatter_func`` in
``tensor_parallel.mappings`` and ``.layers``). "Bytes" is the payload on one rank: the tensor
of an all-reduce or broadcast, the gathered output of an all-gather, the input of a
reduce-scatter.

Table 2 routes real text with a trained run: ``--run-dir`` names one (trained there first,
and kept, if it has no checkpoint yet); without it a default tiny run is trained in a
temporary directory and deleted. Training is ``python -m pretrain train run.dir=RUN
data.tokenizer.path=RUN-tokenizer.model train.max_steps=150 wandb.mode=disabled
--no-progress`` (the tokenizer beside the run rather than under ./runs).

    python bench/context_parallel.py                      # ~1 min + training the tiny run
    python bench/context_parallel.py --run-dir runs/tiny  # an existing run: ~1 min on 2 cores
    python bench/context_parallel.py --scan-lengths 4096 16384 --step-length 2048

Training 150 steps dominates: on the 2 shared development cores the whole run took 2.6 min
(96 s of training) at a load average of 3-10, 7.5 min (6.5 of training) at ~14; use
``--run-dir`` to train once and reuse the run.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")
MEGATRON_BINDINGS = {
    "dist_all_gather_func": "all_gather_into_tensor",
    "dist_reduce_scatter_func": "reduce_scatter_tensor",
}
# English prose shipped with the repository; --text takes any UTF-8 file.
DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus" / "moby_dick.txt"
VOCAB = 2048  # table 3's random tokens (the tiny run's vocabulary size)


class CollectiveCounter:
    """Adds the payload bytes of every collective called inside ``with`` to ``counts``."""

    def __init__(self) -> None:
        import torch.distributed as dist
        from megatron.core.tensor_parallel import layers, mappings

        # megatron-core binds its all-gather / reduce-scatter functions at import time, in
        # mappings.py and layers.py: wrap those bindings as well as torch.distributed's names.
        self.targets = [(dist, name, name) for name in COLLECTIVES] + [
            (module, binding, kind)
            for module in (mappings, layers)
            for binding, kind in MEGATRON_BINDINGS.items()
        ]
        self.counts: collections.Counter = collections.Counter()
        self.originals: list = []

    def __enter__(self) -> collections.Counter:
        self.counts = collections.Counter()
        self.originals = [(module, name, getattr(module, name)) for module, name, _ in self.targets]
        for module, name, kind in self.targets:
            setattr(module, name, self._counting(getattr(module, name), kind))
        return self.counts

    def __exit__(self, *exc: object) -> None:
        for module, name, fn in self.originals:
            setattr(module, name, fn)

    def _counting(self, fn, kind: str):
        def call(*a, **kw):
            # all-gather: the gathered output (a[0]); reduce-scatter: its input (a[1]).
            tensor = a[1] if kind == "reduce_scatter_tensor" else a[0]
            self.counts[kind] += tensor.numel() * tensor.element_size()
            return fn(*a, **kw)

        return call


def init_context_parallel(rank: int, world: int) -> None:
    """A gloo world whose ranks form one context-parallel group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel import cpu_compat

    cpu_compat.install()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(context_parallel_size=world)


def shut_down() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- 1) EMA scan bytes


def scan_worker(rank: int, world: int, args: dict) -> dict:
    warnings.simplefilter("ignore")  # megatron-core's notes about Apex / TE / CUDA on CPU
    import torch
    from megatron.core import parallel_state

    from parallel.scan import context_parallel_ema
    from pretrain.model.ema import DampedEMA

    init_context_parallel(rank, world)
    group = parallel_state.get_context_parallel_group()
    counter = CollectiveCounter()
    out = {}
    for length in args["lengths"]:
        torch.manual_seed(0)  # the same EMA on every rank
        ema = DampedEMA(args["width"], args["ndim"], chunk=args["ema_chunk"])
        gen = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(length // world, args["batch"], args["width"], generator=gen)
        x.requires_grad_(True)
        with counter as forward:
            y = context_parallel_ema(ema, x, group)
        with counter as backward:
            y.pow(2).mean().backward()
        out[length] = {"forward": dict(forward), "backward": dict(backward)}
    shut_down()
    return out


def scan_table(args: argparse.Namespace) -> None:
    from testing.local import run_ranks

    cp, b, d, n = args.scan_cp, args.batch, args.width, args.ndim
    print(
        f"\n1) bytes per rank moved by the EMA scan of one layer (context_parallel_ema), "
        f"CP={cp}, B={b}, D={d}, N={n}, ema chunk {args.ema_chunk}, fp32, forward + backward"
    )
    print(
        f"   theory: forward all-gather of the final states cp*B*D*N*4 = {cp * b * d * n * 4:,} B,"
        f" backward reduce-scatter the same; contrast: an all-gather of the activations, "
        f"L*B*D*4. Not counted: the EMA parameters' partial gradients, summed by the "
        f"data-parallel all-reduce over DP x CP"
    )
    setting = {
        "lengths": args.scan_lengths, "width": d, "ndim": n, "batch": b,
        "ema_chunk": args.ema_chunk,
    }  # fmt: skip
    results = run_ranks(scan_worker, cp, setting, timeout=600)
    theory = cp * b * d * n * 4
    header = f"{'L':>6} | {'pass':>8} | {'collective':>22} | {'measured B':>10} | {'theory B':>9}"
    print(f"{header} | {'activation all-gather B':>23}")
    totals = {}
    for length in args.scan_lengths:
        per_rank = [r[length] for r in results]
        if any(r != per_rank[0] for r in per_rank):  # payloads are the same on every rank
            raise AssertionError(f"ranks moved different bytes at L={length}: {per_rank}")
        expected = {
            "forward": {"all_gather_into_tensor": theory},
            "backward": {"reduce_scatter_tensor": theory},
        }
        first = True
        for phase in ("forward", "backward"):
            counts = per_rank[0][phase]
            for kind in sorted(set(counts) | set(expected[phase])) or ["(none)"]:
                label = f"{length // 1024}K" if first else ""
                tail = f" | {length * b * d * 4:>23,}" if first else ""
                print(
                    f"{label:>6} | {phase:>8} | {kind:>22} | {counts.get(kind, 0):>10,} | "
                    f"{expected[phase].get(kind, 0):>9,}{tail}"
                )
                first = False
        totals[length] = sum(sum(per_rank[0][p].values()) for p in ("forward", "backward"))
        print(f"{'':>6} | {'total':>8} | {'':>22} | {totals[length]:>10,} | {2 * theory:>9,}")
    lo, hi = args.scan_lengths[0], args.scan_lengths[-1]
    print(
        f"scan bytes {hi // 1024}K / {lo // 1024}K: {totals[hi] / totals[lo]:.3f} "
        f"(activation all-gather: {hi / lo:.0f}x); at {hi // 1024}K the scan moves "
        f"{totals[hi] / (2 * hi * b * d * 4):.5f} of an activation all-gather + reduce-scatter"
    )


# --------------------------------------------------------------------------- 2) dispatch


def work_split(activated, cp: int, window: int) -> tuple[list[int], list[int]]:
    """Work items of each of ``cp`` contiguous chunks of an [L, B] activation pattern, before
    and after ``dispatch.balance`` (a rank's items after: its column of the send matrix)."""
    from parallel.dispatch import balance, count_items

    before = [count_items(chunk.sum(0), window) for chunk in activated.chunk(cp, 0)]
    send = balance(before)
    after = [sum(row[j] for row in send) for j in range(cp)]
    if sum(after) != sum(before):
        raise AssertionError(f"balance() does not keep the items: {before} -> {after}")
    return before, after


def imbalance_row(label: str, activated, cps: list[int], window: int) -> str:
    """One table row: the pattern's activation ratio, then before / after for each CP."""
    from parallel.dispatch import imbalance

    cells, lists = [f"{label:>34}", f"{float(activated.float().mean()):>5.3f}"], ""
    for cp in cps:
        before, after = work_split(activated, cp, window)
        cells.append(f"{imbalance(before):>6.2f} {imbalance(after):>6.2f}")
        if cp == cps[0]:
            lists = f"{' '.join(map(str, before))} -> {' '.join(map(str, after))}"
    return " | ".join(cells) + f" | {lists}"


def trained_run(args: argparse.Namespace, scratch: Path) -> Path:
    """The run to route real text with: ``--run-dir`` (trained there if it has no checkpoint
    yet) or a default tiny run trained under ``scratch``."""
    run = Path(args.run_dir) if args.run_dir else scratch / "run"
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        print(f"   routing with the trained run {run}")
        return run
    cmd = [
        sys.executable, "-m", "pretrain", "train", f"run.dir={run}",
        f"data.tokenizer.path={run.parent / (run.name + '-tokenizer.model')}",
        f"train.max_steps={args.train_steps}", "wandb.mode=disabled", "--no-progress",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training failed ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}")
    val = [line for line in done.stdout.splitlines() if "val loss" in line]
    print(
        f"   trained a default tiny run for {args.train_steps} steps in "
        f"{time.perf_counter() - start:.0f} s ({val[-1].strip() if val else 'no val line'})"
    )
    return run


def dispatch_table(args: argparse.Namespace) -> None:
    import torch

    from pretrain.checkpointer import load_trained

    cps = args.dispatch_cp
    print(
        "\n2) attention work per CP rank: items = sum over batch columns of "
        "ceil(activated / window) on the rank's contiguous chunk; imbalance = max / mean over "
        "ranks, before and after dispatch.balance (after: each rank's column of the send "
        "matrix)"
    )
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as scratch:
        run = trained_run(args, Path(scratch))
        cfg, tokenizer, model, step = load_trained(run, torch.device("cpu"))
        window = cfg.model.window
        text = Path(args.text).read_text(encoding="utf-8")
        ids = tokenizer.encode(text[: 20 * args.text_tokens])[: args.text_tokens]
        if len(ids) < args.text_tokens:
            raise ValueError(f"{args.text} gave only {len(ids)} tokens")
        model.eval()
        with torch.no_grad():
            _, stats = model(torch.tensor([ids]), collect_stats=True)

    columns = " | ".join(f"CP={cp} before  after" for cp in cps)
    header = f"{'pattern':>34} | {'act':>5} | {columns} | CP={cps[0]} items before -> after"
    print(header)
    source = run if args.run_dir else "the run trained above"
    print(
        f"    (a) the first {len(ids)} tokens of {Path(args.text).name} (B=1) routed by {source} "
        f"at step {step}, its window {window}"
    )
    rows = []  # (pattern [L, B], window) of every row
    for i, s in enumerate(stats):
        rows.append((s.activated, window))
        print(imbalance_row(f"(a) layer {i}", s.activated, cps, window))

    length, batch, window = args.pattern_length, args.pattern_batch, args.pattern_window
    print(f"    synthetic patterns: L={length}, B={batch}, window {window}")
    for cp in cps:  # every token of rank 0's chunk, none elsewhere
        act = torch.zeros(length, batch, dtype=torch.bool)
        act[: length // cp] = True
        rows.append((act, window))
        print(imbalance_row(f"(b) all on rank 0 of CP={cp}", act, cps, window))
    gen = torch.Generator().manual_seed(0)
    act = torch.rand(length, batch, generator=gen) < args.random_ratio
    print(imbalance_row(f"(c) uniform random {args.random_ratio}", act, cps, window))
    rows.append((act, window))
    optimal = all(
        max(after) == -(-sum(after) // cp)
        for act, w in rows
        for cp in cps
        for after in [work_split(act, cp, w)[1]]
    )
    print(
        f"after = the integer optimum (ceil(items / CP) on the busiest rank) in every row: "
        f"{'yes' if optimal else 'NO'}"
    )


# --------------------------------------------------------------------------- 3) step time


def step_worker(rank: int, world: int, args: dict) -> dict:
    warnings.simplefilter("ignore")  # megatron-core's notes about Apex / TE / CUDA on CPU
    import torch
    import torch.distributed as dist

    from parallel.dims import ParallelDims
    from pretrain.config import ModelConfig
    from pretrain.model.lm import LanguageModel

    init_context_parallel(rank, world)
    cp = ParallelDims.from_parallel_state().context
    cfg = ModelConfig(layers=args["layers"], width=args["width"], window=args["window"])
    # As pretrain/build.py's model_for: the single-process model from one seed, then its
    # weights in the context-parallel model.
    torch.manual_seed(0)
    model = LanguageModel(cfg, VOCAB)
    if cp.active:
        full = model.state_dict()
        model = LanguageModel(cfg, VOCAB, cp=cp)
        model.load_state_dict(full)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (args["batch"], args["length"] + 1), generator=gen)
    local = cp.chunk(tokens)  # [B, L/cp + 1]

    times, activated = [], []
    for i in range(args["repeats"] + 1):  # the first run warms up
        dist.barrier()
        start = time.perf_counter()
        loss, stats = model.loss(local, collect_stats=True)
        loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if i:
            times.append(elapsed)
        activated = [int(s.activated.sum()) for s in stats]
    shut_down()
    return {"times": times, "activated": activated, "chunk": local.shape[1] - 1}


def step_table(args: argparse.Namespace) -> None:
    from testing.local import run_ranks

    length, batch = args.step_length, 1
    print(
        f"\n3) forward + backward of a {args.step_layers}-layer SeqBoat LM, D={args.step_width}, "
        f"window {args.window}, vocab {VOCAB}, L={length} in total, B={batch}, fp32 on "
        f"CPU/gloo, each rank 1 thread; min of {args.repeats} after a warm-up (a step's time: "
        f"its slowest rank). CP=4 runs 4 processes on {_cores()} cores: oversubscribed, so "
        f"its time is not what 4 devices would take. Load average now {_load()}"
    )
    print(f"{'CP':>3} | {'chunk':>6} | {'step s':>7} | {'x CP=1':>6} | max activated tokens/rank")
    reference = None
    for cp in args.step_cp:
        setting = {
            "layers": args.step_layers, "width": args.step_width, "window": args.window,
            "batch": batch, "length": length, "repeats": args.repeats,
        }  # fmt: skip
        results = run_ranks(step_worker, cp, setting, timeout=600)
        step = min(max(r["times"][i] for r in results) for i in range(args.repeats))
        reference = reference or step
        per_layer = [max(r["activated"][k] for r in results) for k in range(args.step_layers)]
        layers = ", ".join(f"layer {k}: {a}" for k, a in enumerate(per_layer))
        print(
            f"{cp:>3} | {results[0]['chunk']:>6} | {step:>7.3f} | {step / reference:>6.2f} | "
            f"{layers} (of {results[0]['chunk'] * batch})",
            flush=True,
        )


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _load() -> str:
    """The 1-minute load average: other processes on these cores slow every timing here."""
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scan-lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--scan-cp", type=int, default=4)
    ap.add_argument("--width", type=int, default=256, help="EMA channels D of table 1")
    ap.add_argument("--ndim", type=int, default=16, help="EMA state N of table 1")
    ap.add_argument("--batch", type=int, default=1, help="batch of table 1")
    ap.add_argument("--ema-chunk", type=int, default=1024)
    ap.add_argument("--dispatch-cp", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--run-dir", help="a trained run to route real text with (table 2)")
    ap.add_argument("--train-steps", type=int, default=150, help="when a run is trained here")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="a UTF-8 text file to route")
    ap.add_argument("--text-tokens", type=int, default=4096)
    ap.add_argument("--pattern-length", type=int, default=4096)
    ap.add_argument("--pattern-batch", type=int, default=2)
    ap.add_argument("--pattern-window", type=int, default=64)
    ap.add_argument("--random-ratio", type=float, default=0.3)
    ap.add_argument("--step-cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--step-length", type=int, default=4096)
    ap.add_argument("--step-layers", type=int, default=2)
    ap.add_argument("--step-width", type=int, default=128)
    ap.add_argument("--window", type=int, default=64, help="attention window of table 3")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for length in args.scan_lengths:
        if length % args.scan_cp:
            ap.error(f"--scan-lengths: {length} is not divisible by --scan-cp {args.scan_cp}")
    if any(args.step_length % cp for cp in args.step_cp):
        ap.error("--step-length must be divisible by every --step-cp")

    import torch

    start = time.perf_counter()
    print(
        f"context parallelism: each sequence split into CP contiguous chunks, one rank each; "
        f"torch {torch.__version__}, {_cores()} CPU cores, load average {_load()}"
    )
    scan_table(args)
    dispatch_table(args)
    step_table(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
