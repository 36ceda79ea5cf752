"""Forward+backward time and peak memory of one SeqBoat layer vs one Transformer layer.

Prints two tables measured in this one run:
  1. SeqBoat vs Transformer layer for growing sequence length L (routing as initialised);
  2. the SeqBoat layer at forced activation ratios 1.0, 0.5, 0.25, 0.1 (via the activation
     bias), at one length.

Each measurement runs in a fresh subprocess, so "peak memory" is that process's peak resident
set size above its size just before the first forward (CPU; on CUDA, peak allocated bytes).

    python bench/layer_scaling.py                       # the defaults below, ~5 min on 2 cores
    python bench/layer_scaling.py --lengths 1024 4096 --ratio-length 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def layer_config(args: argparse.Namespace, arch: str, act_bias: float = 0.0):
    from pretrain.config import ModelConfig

    return ModelConfig(
        arch=arch, width=args.width, zdim=args.zdim, hdim=2 * args.width, window=args.window,
        transformer_heads=args.heads, transformer_ffn=4 * args.width, act_bias=act_bias,
    )  # fmt: skip


def bias_for_ratio(args: argparse.Namespace, length: int, ratio: float) -> float:
    """The activation bias that makes the freshly initialised layer activate ``ratio`` of the
    tokens: the (1 - ratio) quantile of (activate logit - skip logit)."""
    import torch

    from pretrain.model.layer import SeqBoatLayer

    torch.manual_seed(0)
    layer = SeqBoatLayer(layer_config(args, "seqboat"))
    x = torch.randn(length, 1, args.width)
    with torch.no_grad():
        m = torch.nn.functional.silu(layer.ema(layer.norm(x)))
        u = layer.hx_proj(m)[..., :2]
    margin = (u[..., 1] - u[..., 0]).flatten()
    if ratio >= 1.0:
        return float(margin.min()) - 1.0
    return float(torch.quantile(margin.double(), 1.0 - ratio))


def worker(args: argparse.Namespace) -> None:
    import torch

    from pretrain.model.layer import SeqBoatLayer
    from pretrain.model.transformer import TransformerLayer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = layer_config(args, args.arch, args.act_bias)
    layer = (SeqBoatLayer if args.arch == "seqboat" else TransformerLayer)(cfg)
    x = torch.randn(args.length, 1, args.width, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, ratio = [], 1.0
    for i in range(args.repeats + 1):  # the first run warms up allocator and kernels
        start = time.perf_counter()
        y, stats = layer(x, collect_stats=args.arch == "seqboat")
        y.float().pow(2).mean().backward()
        if i:
            times.append(time.perf_counter() - start)
        if stats is not None:
            ratio = float(stats.activated.float().mean())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"time": min(times), "peak_mib": peak_kib / 1024, "ratio": ratio}))


def measure(args: argparse.Namespace, arch: str, length: int, act_bias: float = 0.0) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--arch", arch, "--length", str(length),
        "--act-bias", repr(act_bias), "--width", str(args.width), "--zdim", str(args.zdim),
        "--window", str(args.window), "--heads", str(args.heads), "--repeats", str(args.repeats),
        "--threads", str(args.threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    ap.add_argument("--ratio-length", type=int, default=8192)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--zdim", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="seqboat", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--act-bias", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    print(
        f"one layer, batch 1, D={args.width}, H={2 * args.width}, Z={args.zdim}, "
        f"window={args.window}, Transformer {args.heads} heads + FFN {4 * args.width}; "
        f"fp32 CPU, {args.threads or torch.get_num_threads()} threads; "
        f"min of {args.repeats} fwd+bwd"
    )
    print("\n1) sequence length (SeqBoat routing as initialised)")
    header = f"{'L':>6} | {'SeqBoat s':>9} {'MiB':>7} {'act':>5} | {'Transf. s':>9} {'MiB':>7}"
    print(f"{header} | {'T/S':>5}")
    rows = []
    for length in args.lengths:
        s, t = measure(args, "seqboat", length), measure(args, "transformer", length)
        rows.append((length, s, t))
        print(
            f"{length:>6} | {s['time']:>9.3f} {s['peak_mib']:>7.0f} {s['ratio']:>5.2f} | "
            f"{t['time']:>9.3f} {t['peak_mib']:>7.0f} | {t['time'] / s['time']:>5.2f}",
            flush=True,
        )
    (l0, s0, t0), (l1, s1, t1) = rows[0], rows[-1]
    print(
        f"growth {l0}->{l1} (x{l1 // l0}): SeqBoat time x{s1['time'] / s0['time']:.1f}, "
        f"Transformer time x{t1['time'] / t0['time']:.1f}"
    )

    print(f"\n2) SeqBoat layer at forced activation ratios, L={args.ratio_length}")
    print(f"{'target':>6} | {'actual':>6} | {'time s':>7} {'MiB':>7} | {'time / ratio 1.0':>16}")
    reference = None
    for ratio in args.ratios:
        r = measure(
            args, "seqboat", args.ratio_length, bias_for_ratio(args, args.ratio_length, ratio)
        )
        reference = reference or r["time"]
        print(
            f"{ratio:>6.2f} | {r['ratio']:>6.3f} | {r['time']:>7.3f} {r['peak_mib']:>7.0f} | "
            f"{r['time'] / reference:>16.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
