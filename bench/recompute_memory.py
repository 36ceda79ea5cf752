"""Activation recompute: peak memory and step time for ``train.recompute`` none / gau / layer,
beside the Transformer baseline (PyTorch SDPA), per layer and for a small model.

Every case runs in a fresh subprocess (one forward+backward to warm up, then ``--repeats``
timed ones). Two memory figures per case:

* ``peak``: on CPU, the process's resident-set high-water mark (``ru_maxrss``) above its
  value just before the first forward: model, input, optimizer-free gradients and all
  activations alive at once, as the OS saw them (glibc's heap may hold freed blocks, so it
  is an upper bound of what was live); on CUDA, ``torch.cuda.max_memory_allocated`` above
  the allocation before the first forward.
* ``kept``: the bytes autograd keeps for backward after one forward (distinct storages
  passed to ``saved_tensors_hooks``: exact, independent of the allocator). This is the
  activation memory recompute is for; the peak adds one layer's recompute in backward.

    python bench/recompute_memory.py                        # CPU defaults, ~5 min on 2 cores
    python bench/recompute_memory.py --lengths 4096 --layers 2
    python bench/recompute_memory.py --device cuda --precision bf16 --width 1024 --batch 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

MODES = ("none", "gau", "layer")


def model_config(args: argparse.Namespace, arch: str):
    from pretrain.config import ModelConfig

    return ModelConfig(
        arch=arch, layers=args.layers, width=args.width, zdim=args.zdim, hdim=2 * args.width,
        window=args.window, transformer_heads=args.heads, transformer_ffn=4 * args.width,
        vocab_multiple=64,
    )  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    import torch

    from parallel import cpu_compat
    from pretrain.model.layer import SeqBoatLayer
    from pretrain.model.lm import LanguageModel
    from pretrain.model.recompute import set_recompute
    from pretrain.model.transformer import TransformerLayer

    # Imported before the baseline in every case: megatron-core's import alone is ~100 MiB.
    cpu_compat.install()
    import megatron.core.tensor_parallel  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    cfg = model_config(args, args.arch)
    if args.scope == "layer":
        model = (SeqBoatLayer if args.arch == "seqboat" else TransformerLayer)(cfg).to(device)
        x = torch.randn(args.length, args.batch, args.width, device=device, requires_grad=True)

        def step() -> tuple:
            y, stats = model(x, collect_stats=args.arch == "seqboat")
            return y.float().pow(2).mean(), [stats] if stats is not None else []
    else:
        model = LanguageModel(cfg, args.vocab).to(device)
        tokens = torch.randint(0, args.vocab, (args.batch, args.length + 1), device=device)

        def step() -> tuple:
            return model.loss(tokens, collect_stats=args.arch == "seqboat")

    set_recompute(model, args.mode)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )

    def run() -> list:
        with autocast:
            loss, stats = step()
        loss.backward()
        return stats or []

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, ratio = [], 1.0
    for i in range(args.repeats + 1):  # the first run warms up allocator and kernels
        model.zero_grad(set_to_none=False)  # gradients stay allocated: not part of the peak
        start = time.perf_counter()
        stats = run()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        if stats:
            ratio = float(torch.cat([s.activated.flatten() for s in stats]).float().mean())
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss, _ = step()
    loss.backward()
    result = {"time": min(times), "peak_mib": peak / 2**20, "kept_mib": sum(kept.values()) / 2**20}
    print(json.dumps({**result, "ratio": ratio}))


def measure(args: argparse.Namespace, scope: str, arch: str, mode: str, length: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--scope", scope, "--arch", arch, "--mode", mode,
        "--length", str(length), "--width", str(args.width), "--zdim", str(args.zdim),
        "--window", str(args.window), "--heads", str(args.heads), "--layers", str(args.layers),
        "--vocab", str(args.vocab), "--batch", str(args.batch), "--repeats", str(args.repeats),
        "--device", args.device, "--precision", args.precision, "--threads", str(args.threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(args: argparse.Namespace, scope: str) -> dict:
    what = "one layer" if scope == "layer" else f"{args.layers}-layer LM (vocab {args.vocab})"
    print(f"\n{what}: peak / kept MiB, step s; ratios to recompute=none at the same L")
    print(
        f"{'L':>6} {'case':>12} | {'peak MiB':>8} {'kept MiB':>8} {'step s':>7} | "
        f"{'peak/none':>9} {'kept/none':>9} {'time/none':>9} | {'act':>4}"
    )
    rows: dict = {}
    for length in args.lengths:
        cases = [("seqboat", m) for m in MODES] + [("transformer", "none")]
        for arch, mode in cases:
            r = measure(args, scope, arch, mode, length)
            rows[(length, arch, mode)] = r
            none = rows[(length, "seqboat", "none")]
            name = f"{mode}" if arch == "seqboat" else "transformer"
            act = f"{r['ratio']:>4.2f}" if arch == "seqboat" else f"{'':>4}"
            print(
                f"{length:>6} {name:>12} | {r['peak_mib']:>8.0f} {r['kept_mib']:>8.0f} "
                f"{r['time']:>7.3f} | {r['peak_mib'] / none['peak_mib']:>9.2f} "
                f"{r['kept_mib'] / none['kept_mib']:>9.2f} {r['time'] / none['time']:>9.2f} | "
                f"{act}",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--zdim", type=int, default=32)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4, help="of the model (the layer table: 1)")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--scopes", nargs="+", default=["layer", "model"])
    ap.add_argument("--goal-length", type=int, default=8192)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scope", default="layer", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="seqboat", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    print(
        f"D={args.width}, H={2 * args.width}, Z={args.zdim}, window={args.window}, batch "
        f"{args.batch}; Transformer {args.heads} heads + FFN {4 * args.width}; {args.precision} "
        f"on {args.device} ({args.threads or torch.get_num_threads()} threads); "
        f"min of {args.repeats} fwd+bwd; "
        "routing as initialised ('act': activation ratio)"
    )
    results = {scope: table(args, scope) for scope in args.scopes}
    if "model" in results and args.goal_length in args.lengths:
        rows, g = results["model"], args.goal_length
        none, layer = rows[(g, "seqboat", "none")], rows[(g, "seqboat", "layer")]
        print(
            f"\ngoal at L={g} (model): layer keeps {layer['kept_mib'] / none['kept_mib']:.2f} of "
            f"none's activations (goal <= 0.33), peak {layer['peak_mib'] / none['peak_mib']:.2f}, "
            f"for {layer['time'] / none['time']:.2f}x the step time (goal <= 1.4)"
        )


if __name__ == "__main__":
    main()
