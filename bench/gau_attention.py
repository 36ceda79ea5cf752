"""The GAU's local attention: the fused kernel (``scaled_dot_product_attention``) against the
reference path that builds and keeps the [I, b, w + b] score blocks, forward + backward.

For each window w, query block b (``model.attention_block``; by default w, w/2 and w/4) and
compressed length M (every token activated: the GAU's worst case) one row: seconds per
forward+backward and peak memory, fused and reference side by side, and their ratios.
Each measurement runs in a fresh subprocess, so "peak memory" is that process's peak
resident set size above its size just before the first forward (CPU; on CUDA, peak
allocated bytes).

    python bench/gau_attention.py                      # w 256 and 1024, M 4K..16K, ~12 min
    python bench/gau_attention.py --windows 64 --lengths 1024 2048 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import torch

    from pretrain.model.gau import GatedAttentionUnit

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gau = GatedAttentionUnit(
        args.width, args.zdim, 2 * args.width, args.window, block=args.block
    ).to(device)
    gau.fused = args.kernel == "fused"
    m = torch.randn(args.length, 1, args.width, device=device, requires_grad=True)
    positions = torch.arange(args.length, device=device).unsqueeze(1)
    valid = torch.ones(args.length, 1, dtype=torch.bool, device=device)

    def step() -> None:
        out, _ = gau(m, positions, valid)
        out.square().mean().backward()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # resident set size above the size before the first forward
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**10
    print(json.dumps({"s": min(times), "mib": peak}))


def measure(args: argparse.Namespace, window: int, block: int, length: int, kernel: str) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--kernel", kernel, "--window", str(window),
        "--block", str(block), "--length", str(length), "--width", str(args.width),
        "--zdim", str(args.zdim), "--repeats", str(args.repeats),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[256, 1024])
    parser.add_argument(
        "--block-divisors", type=int, nargs="+", default=[1, 2, 4],
        help="query blocks of w / d for each d",
    )  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--zdim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of N")
    # One measurement (the subprocess).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kernel", choices=["fused", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    print(
        f"GAU forward+backward, D={args.width}, Z={args.zdim}, H={2 * args.width}, every "
        f"token activated, fp32, best of {args.repeats}; torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    )
    header = (
        f"{'w':>5} | {'b':>5} | {'M':>6} | {'fused s':>8} | {'ref s':>8} | {'time ratio':>10} | "
        f"{'fused MiB':>9} | {'ref MiB':>8} | {'memory ratio':>12}"
    )
    print(header)
    print("-" * len(header))
    for window in args.windows:
        for block in (window // d for d in args.block_divisors):
            for length in args.lengths:
                fused = measure(args, window, block, length, "fused")
                ref = measure(args, window, block, length, "reference")
                print(
                    f"{window:>5} | {block:>5} | {length:>6} | {fused['s']:>8.3f} | "
                    f"{ref['s']:>8.3f} | "
                    f"{fused['s'] / ref['s']:>10.2f} | {fused['mib']:>9.0f} | "
                    f"{ref['mib']:>8.0f} | {fused['mib'] / max(ref['mib'], 1e-9):>12.2f}"
                )


if __name__ == "__main__":
    main()
