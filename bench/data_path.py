"""The data path at cluster scale, measured on this machine in one run.

1. Data-path tokens/s per core, streamed (datasets + sentencepiece) and pre-tokenized
   (``seqboat prepare data`` shards), for the tiny and the 125M batch shapes, against what
   a rank consumes (tiny: measured here; 125M/350M on a GPU: the 150 K tokens/s reference).
2. Per-rank data work per step at DP = 1, 2, 4, 8 (rank 0's characters tokenized, or tokens
   read, and its wall time), against today's loader, in which every rank builds the whole
   global batch (that is the DP = 1 work, on every rank).
3. The tiny run's data wait (time the step blocks on the loader) as a fraction of step time,
   with the background producer (data.prefetch=2) and without it (0).
4. What one rank can feed at DP = 64 and 512 (350M shape, 512 x 2048 tokens per step), from
   the measured per-unit costs: a lane-sample (from the DP=1 and DP=8 times of the 125M
   shape, so that the per-rank constant cancels out) and, streamed only, the scan of one
   raw document of another rank's lanes (the per-rank constant: every rank reads every
   document of the global batch).

    python bench/data_path.py                 # ~4 min on 2 cores
    python bench/data_path.py --steps 6 --run-steps 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_TOKENS_PER_S = 150_000  # a 350M model on one H100 (the reference)
SHAPES = {"tiny": (256, 16), "125m": (2048, 256)}  # (seq_length, global_batch_size)


def sources(tokenized: Path | None):
    from data.config import SourceConfig

    if tokenized is not None:  # what `prepare_sources` wrote for the two sources below
        return [SourceConfig(tokenized=str(tokenized / f"source_{i}")) for i in range(2)]
    corpus = ROOT / "tests" / "data" / "corpus"
    return [SourceConfig(builtin="pydoc"), SourceConfig(path=str(corpus / "*.txt"))]


def per_rank(tokenizer, shape: str, tokenized: Path | None, dp: int, steps: int) -> dict:
    """Rank 0 of ``dp``: seconds and data work per step (after one warm-up step)."""
    from data.config import DataConfig
    from data.loader import PretrainLoader

    seq, batch = SHAPES[shape]
    cfg = DataConfig(sources=sources(tokenized), shuffle_buffer=batch, prefetch=0)
    loader = PretrainLoader(cfg, tokenizer, seq, batch, dp_rank=0, dp_size=dp)
    next(loader)
    chars, tokens = loader.chars_tokenized, loader.tokens_read
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    seconds = (time.perf_counter() - start) / steps
    return {
        "s": seconds,
        "chars": (loader.chars_tokenized - chars) / steps,
        "tokens": (loader.tokens_read - tokens) / steps,
        "rows_tokens": batch // dp * (seq + 1),
    }


def scan_cost(tokenizer) -> tuple[float, float]:
    """Seconds to read (and skip) one raw document of the prose corpus as a streamed source
    does for another rank's lanes, and that corpus's mean tokens per document."""
    from data.config import SourceConfig
    from data.sources import open_source

    dataset = open_source(SourceConfig(path=str(ROOT / "tests" / "data" / "corpus" / "*.txt")))
    texts = [example["text"] for example in dataset]  # warm
    start = time.perf_counter()
    for _ in dataset:  # the reader copies no position for documents it skips
        pass
    seconds = (time.perf_counter() - start) / len(texts)
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts[:2000]) / min(len(texts), 2000)
    return seconds, tokens


def tiny_run(tokenizer_path: str, prefetch: int, steps: int, run_dir: Path) -> dict:
    from pretrain.config import load_config
    from pretrain.monitor import read_metrics
    from pretrain.train import Trainer

    cfg = load_config(
        None,
        [
            f"run.dir={run_dir}", "wandb.mode=disabled", f"data.tokenizer.path={tokenizer_path}",
            f"data.prefetch={prefetch}", f"train.max_steps={steps}", "train.log_interval=10",
            f"train.eval_interval={steps}", f"checkpoint.interval={steps}", "train.threads=1",
        ],
    )  # fmt: skip
    Trainer(cfg, progress=False).train()
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    late = records[1:]  # the first window holds the warm-up
    waits = [r["train/data_wait_fraction"] for r in late]
    times = [r["train/step_time_s"] for r in late]
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    return {"wait": float(np.mean(waits)), "step_s": float(np.mean(times)), "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="loader steps timed per setting")
    ap.add_argument("--run-steps", type=int, default=60, help="steps of the tiny run")
    args = ap.parse_args()

    import torch

    from data.config import DataConfig, TokenizerConfig
    from data.prepare import PrepareOptions, prepare_sources
    from data.tokenizer import build_tokenizer

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="seqboat-data-bench-"))
    tok_cfg = TokenizerConfig(path=str(work / "bpe-2048.model"), vocab_size=2048)
    tokenizer = build_tokenizer(tok_cfg, sources(None))
    prepared = work / "prepared"
    start = time.perf_counter()
    prepare_sources(
        DataConfig(sources=sources(None), tokenizer=tok_cfg), prepared, PrepareOptions(parts=2)
    )
    print(f"prepared {prepared} in {time.perf_counter() - start:.1f} s (1 process)\n")

    print("1) data-path tokens/s on one core (rank 0 of DP=1 builds the whole global batch)")
    print(f"{'shape':6} {'source':9} {'tokens/s':>10} {'x GPU 150K/s':>12}")
    single = {}
    for shape in SHAPES:
        for name, directory in (("streamed", None), ("prepared", prepared)):
            r = per_rank(tokenizer, shape, directory, 1, args.steps)
            single[shape, name] = r
            rate = r["rows_tokens"] / r["s"]
            print(f"{shape:6} {name:9} {rate:10,.0f} {rate / GPU_TOKENS_PER_S:12.2f}")

    print("\n2) per-rank work per step, rank 0 (today: every rank does the DP=1 work)")
    print(
        f"{'shape':6} {'source':9} {'DP':>3} {'work/step':>12} {'today':>12} {'ratio':>6} "
        f"{'s/step':>8} {'today s':>8}"
    )
    per_lane: dict[str, float] = {}
    r_tokens: dict[str, int] = {}
    for shape in SHAPES:
        for name, directory in (("streamed", None), ("prepared", prepared)):
            key = "chars" if directory is None else "tokens"
            base = single[shape, name]
            for dp in (1, 2, 4, 8):
                r = base if dp == 1 else per_rank(tokenizer, shape, directory, dp, args.steps)
                print(
                    f"{shape:6} {name:9} {dp:3d} {r[key]:12,.0f} {base[key]:12,.0f} "
                    f"{r[key] / base[key]:6.3f} {r['s']:8.4f} {base['s']:8.4f}"
                )
            if shape == "125m":  # seconds per lane-sample: the DP=1 - DP=8 difference, so
                # that the per-rank constant (the scan) cancels out
                lanes = SHAPES[shape][1]
                per_lane[name] = (base["s"] - r["s"]) / (lanes - lanes // 8)
                r_tokens[name] = SHAPES[shape][0] + 1

    print(f"\n3) tiny run, {args.run_steps} steps: data wait as a fraction of step time")
    runs = {p: tiny_run(tok_cfg.path, p, args.run_steps, work / f"run{p}") for p in (0, 2)}
    for p, r in runs.items():
        label = "producer on (data.prefetch=2)" if p else "in the step (data.prefetch=0)"
        consumed = r["tokens"] / r["step_s"]
        print(
            f"{label:32} wait {100 * r['wait']:5.2f}%  step {r['step_s'] * 1e3:6.1f} ms  "
            f"consumes {consumed:,.0f} tokens/s"
        )
    consumed = runs[2]["tokens"] / runs[2]["step_s"]
    tiny_rate = single["tiny", "streamed"]["rows_tokens"] / single["tiny", "streamed"]["s"]
    print(f"tiny: one core streams {tiny_rate / consumed:.1f}x what the tiny run consumes")

    print("\n4) what one rank can feed at DP = 64 and 512 (350M shape: 512 x 2048 per step)")
    # Per-unit costs measured above: a lane-sample (its own documents tokenized, or read
    # from shards, packed, mixed, shuffled) at DP=8, and the scan of one raw document that
    # belongs to another rank's lanes (streamed only: the per-rank constant).
    scan_s, doc_tokens = scan_cost(tokenizer)
    print(
        f"scan of another lane's raw document: {scan_s * 1e6:.1f} us; documents of "
        f"{doc_tokens:,.0f} tokens here (prose lines), 1,000 assumed for a web corpus"
    )
    seq, lanes = 2048, 512
    print(f"{'source':9} {'doc tok':>7} {'DP':>4} {'rows':>4} {'ms/step':>8} {'tokens/s':>11} "
          f"{'x 150K/s':>8}")  # fmt: skip
    for name in ("streamed", "prepared"):
        r = per_lane[name]
        for tokens_per_doc in (doc_tokens, 1000.0) if name == "streamed" else (None,):
            for dp in (64, 512):
                rows = lanes // dp
                seconds = rows * r * (seq + 1) / r_tokens[name]
                if tokens_per_doc:  # every rank scans every document of the global batch
                    seconds += lanes * (seq + 1) / tokens_per_doc * scan_s
                rate = rows * (seq + 1) / seconds
                label = f"{tokens_per_doc:7,.0f}" if tokens_per_doc else f"{'-':>7}"
                print(
                    f"{name:9} {label} {dp:4d} {rows:4d} {seconds * 1e3:8.2f} {rate:11,.0f} "
                    f"{rate / GPU_TOKENS_PER_S:8.1f}"
                )
    print(f"\n(work files under {work})")


if __name__ == "__main__":
    main()
