"""Hugging Face ``generate()`` of exported models, with their cache and without it.

SeqBoat's cache is its O(1) decoding state (per layer the EMA state and the ring of the last
``window`` activated keys/values), so the cost of a new token should not grow with the
prompt; the Transformer baseline (``model.arch=transformer``), exported the same way, keeps
a growing key/value cache; without a cache both run the whole text again for every token.

Both models are exported by ``seqboat export``'s writer (random weights: speed does not
depend on them) and loaded with ``AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)``. For each prompt length: end-to-end tokens/s of ``generate`` of
``--new-tokens`` greedy tokens (prefill included) without and with the cache, and the cost
of one new token: a forward over the whole text (what ``generate`` without a cache runs
per token) vs one cached step after a prefill.

    python bench/hf_generate.py [--lengths 256,512,1024,2048,4096] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data.tokenizer import ByteTokenizer
from pretrain.build import model_for
from pretrain.config import load_config
from pretrain.hf.export import Trained, write_folder

SHAPE = [
    "data.tokenizer.kind=byte", "model.layers=2", "model.width=64", "model.zdim=16",
    "model.hdim=128", "model.window=64", "model.transformer_heads=4",
    "model.transformer_ffn=256", "train.seq_length=256",
]  # fmt: skip


def exported(arch: str, folder: Path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, [*SHAPE, f"model.arch={arch}", f"run.dir={folder}/run"])
    torch.manual_seed(0)
    model = model_for(cfg, ByteTokenizer.vocab_size, torch.device("cpu")).eval()
    out = folder / arch
    out.mkdir(parents=True)
    write_folder(Trained(cfg, ByteTokenizer(), model, 0, folder / "run"), out, "5GB")
    params = sum(p.numel() for p in model.parameters())
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval(), params


# The clock: wall time, or this process's CPU time ("cpu", with one torch thread: the
# figures then hold on a machine shared with other jobs).
CLOCK = [time.perf_counter]


def timed(model, prompt: torch.Tensor, new: int, cache: bool) -> float:
    start = CLOCK[0]()
    with torch.no_grad():
        model.generate(
            prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=cache
        )
    return CLOCK[0]() - start


def per_token_ms(model, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(one new token without a cache: a forward over the whole text; one new token with the
    cache after a prefill of ``prompt``), medians in ms."""
    with torch.no_grad():
        full = []
        for _ in range(2):
            start = CLOCK[0]()
            model(prompt, use_cache=False)
            full.append(CLOCK[0]() - start)
        cache = model(prompt, use_cache=True).cache
        step = []
        token = prompt[:, -1:]
        for _ in range(steps):
            start = CLOCK[0]()
            cache = model(token, cache=cache, use_cache=True).cache
            step.append(CLOCK[0]() - start)
    return 1e3 * statistics.median(full), 1e3 * statistics.median(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,512,1024,2048,4096")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    lengths = [int(x) for x in args.lengths.split(",")]
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_MODULES_CACHE"] = f"{tmp}/hf_modules"  # before transformers loads
        models = {arch: exported(arch, Path(tmp)) for arch in ("seqboat", "transformer")}
        for arch, (_, params) in models.items():
            print(f"{arch}: {params:,} parameters")
        print(f"clock: {args.clock}, {args.threads} torch thread(s)")
        print(
            f"generate(): tokens/s of {new} greedy new tokens (prefill included), without and "
            "with the cache; ms per new token: a forward over the whole text (no cache) vs one "
            "cached step (median of 16)"
        )
        print(
            f"{'arch':<12}{'prompt':>7}{'tok/s no cache':>16}{'tok/s cache':>13}"
            f"{'ms/tok no cache':>17}{'ms/tok cache':>14}{'ratio':>8}"
        )
        g = torch.Generator().manual_seed(0)
        for length in lengths:
            prompt = torch.randint(0, 256, (1, length), generator=g)
            for arch, (model, _) in models.items():
                timed(model, prompt[:, :32], 2, True)  # warm-up
                uncached = timed(model, prompt, new, False)
                cached = timed(model, prompt, new, True)
                full_ms, step_ms = per_token_ms(model, prompt, 16)
                print(
                    f"{arch:<12}{length:>7}{new / uncached:>16.2f}{new / cached:>13.2f}"
                    f"{full_ms:>17.1f}{step_ms:>14.2f}{full_ms / step_ms:>7.0f}x"
                )


if __name__ == "__main__":
    main()
