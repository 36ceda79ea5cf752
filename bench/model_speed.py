"""Whole-model training tokens/s, SeqBoat against a Transformer of the same parameter count,
for growing sequence length L, on this machine's CPU (or a GPU with --device cuda).

Both models are pretrain/model/lm.py's LanguageModel: SeqBoat with the shape below, with its
router as initialised (activation ratio printed) and with every token through the GAU
(``model.routing=always``, the dense worst case), and the Transformer baseline (RoPE, SDPA,
GELU FFN) with the same width and embedding, head size 64, and layers / FFN width solved
for the same parameter count (bench/gpu_check.py ``match_transformer``; counts printed).
Each row is one fresh process per model: warm-up steps, then the best of ``--repeats``
training steps (forward, backward, AdamW at learning rate 0, so that the routing stays as
initialised: on random tokens a trained router soon skips every token), batch 1, fp32.

    python bench/model_speed.py                          # L = 1K .. 16K, ~6 min on 2 cores
    python bench/model_speed.py --threads 1 --clock cpu    # CPU seconds: steady under load
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seqboat_config(args: argparse.Namespace):
    from pretrain.config import ModelConfig

    return ModelConfig(
        layers=args.layers, width=args.width, zdim=args.zdim, hdim=2 * args.width,
        window=args.window,
    )  # fmt: skip


def model_config(args: argparse.Namespace, arch: str):
    cfg = seqboat_config(args)
    if arch == "seqboat":
        return cfg
    if arch == "seqboat-always":
        return dataclasses.replace(cfg, routing="always")
    from bench.gpu_check import match_transformer

    overrides, _, _ = match_transformer(cfg, args.vocab)
    values = dict(o.removeprefix("model.").split("=") for o in overrides)
    return dataclasses.replace(
        cfg, arch="transformer", layers=int(values["layers"]),
        transformer_heads=int(values["transformer_heads"]),
        transformer_ffn=int(values["transformer_ffn"]),
    )  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    import torch

    from pretrain.build import optimizer_for
    from pretrain.config import OptimizerConfig
    from pretrain.model.lm import LanguageModel

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LanguageModel(model_config(args, args.arch), args.vocab).to(device).train()
    optimizer = optimizer_for(model, OptimizerConfig(name="adamw", lr=0.0))
    tokens = torch.randint(0, args.vocab, (1, args.length + 1), device=device)

    def step(collect_stats: bool = False):
        optimizer.zero_grad(set_to_none=True)
        loss, stats = model.loss(tokens, collect_stats)
        loss.backward()
        optimizer.step()
        return stats

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = []
    for _ in range(args.repeats):
        sync()
        start = clock()
        step()
        sync()
        times.append(clock() - start)
    stats = step(collect_stats=args.arch.startswith("seqboat"))
    ratio = sum(float(s.activated.float().mean()) for s in stats) / len(stats) if stats else None
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"time": min(times), "params": params, "ratio": ratio}))


def measure(args: argparse.Namespace, arch: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--arch", arch, "--length", str(length)]
    for name in ("layers", "width", "zdim", "window", "vocab", "threads", "warmup", "repeats",
                 "clock"):  # fmt: skip
        cmd += [f"--{name}", str(getattr(args, name))]
    cmd += ["--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--zdim", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: the process's CPU time (with --threads 1, steady on a shared machine)",
    )  # fmt: skip
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="seqboat", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    print(
        f"{args.layers}-layer SeqBoat LM, D={args.width}, H={2 * args.width}, Z={args.zdim}, "
        f"window {args.window}, vocab {args.vocab}, against a Transformer LM of the same "
        f"parameter count;\nbatch 1, fp32, {args.device}, torch {torch.__version__}, "
        f"{args.threads} threads; best of {args.repeats} training steps (fwd+bwd+AdamW), "
        f"{args.clock} clock"
    )
    print(
        f"{'':>6} | {'SeqBoat (router)':>20} | {'SeqBoat (always)':>16} | {'Transformer':>11} | "
        f"{'SeqBoat / Transformer':>21}"
    )
    print(
        f"{'L':>6} | {'tok/s':>13} {'act':>6} | {'tok/s':>16} | {'tok/s':>11} | "
        f"{'router':>10} {'always':>10}"
    )
    params = None
    for length in args.lengths:
        s, a, t = (measure(args, arch, length) for arch in ("seqboat", "seqboat-always",
                                                            "transformer"))  # fmt: skip
        params = (s["params"], a["params"], t["params"])
        s_tps, a_tps, t_tps = (length / r["time"] for r in (s, a, t))
        print(
            f"{length:>6} | {s_tps:>13,.0f} {s['ratio']:>6.2f} | {a_tps:>16,.0f} | "
            f"{t_tps:>11,.0f} | {s_tps / t_tps:>10.2f} {a_tps / t_tps:>10.2f}",
            flush=True,
        )
    if params:
        print(
            f"parameters: SeqBoat {params[0]:,} (always: {params[1]:,}), Transformer {params[2]:,}"
        )


if __name__ == "__main__":
    main()
