"""The data path at cluster scale, measured on this machine in one run.

1. Data-path tokens/s per core, streamed (datasets + sentencepiece) and pre-tokenized
   (``seqboat prepare data`` shards), for the tiny and the 125M batch shapes, against what
   a rank consumes (tiny: measured here; 125M/350M on a GPU: the 150 K tokens/s reference).
2. Per-rank data work per step at DP = 1, 2, 4, 8 (rank 0's characters tokenized, or tokens
   read, raw documents scanned, and its wall time), against today's loader, in which every
   rank builds the whole global batch (that is the DP = 1 work, on every rank); "split" is
   the streamed sources copied into many files and read with ``split_files: true``.
3. The tiny run's data wait (time the step blocks on the loader) as a fraction of step time,
   with the background producer (data.prefetch=2) and without it (0).
4. What one rank can feed at DP = 64 and 512 (350M shape, 512 x 2048 tokens per step), from
   the measured per-unit costs: a lane-sample (from the 125M shape's DP = 1..8 times, less
   their measured scans) and, streamed only, the scan of one raw document and the start of
   one file. A streamed source read in one order is scanned whole by every rank; split by
   file (``split_files``) over F files (the user's corpus layout), a rank scans the
   documents of the lane groups of its rows only: max(rows, lanes / min(F, lanes)) lanes'
   worth.

    python bench/data_path.py                 # ~3 min on 2 cores
    python bench/data_path.py --steps 6 --run-steps 100
"""

from __future__ import annotations

import argparse
import math
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
# The many-file copies of the two streamed sources ("split"): pydoc's 79 topics in 16 files
# (a lane group of 16 lanes each at the 125m shape), the prose lines in 256 files (one lane
# and one file a group). The 350M projection (table 4) assumes SPLIT_FILES_350M files.
SPLIT_FILES = {"pydoc": 16, "prose": 256}
SPLIT_FILES_350M = (512, 64)
HOLDOUT = 20  # data.val_fraction = 0.05: a rank also scans the held-out documents
DOCS_PER_FILE = 10_000  # assumed for the 350M projection's split corpus (a file start each)


def sources(kind: str, work: Path):
    from data.config import SourceConfig

    if kind == "prepared":  # what `prepare_sources` wrote for the two streamed sources
        return [SourceConfig(tokenized=str(work / "prepared" / f"source_{i}")) for i in range(2)]
    if kind == "split":  # the same documents, in many files (see split_copy)
        return [
            SourceConfig(path=str(work / "split" / "pydoc_*.jsonl"), split_files=True),
            SourceConfig(path=str(work / "split" / "prose_*.txt"), split_files=True),
        ]
    corpus = ROOT / "tests" / "data" / "corpus"
    return [SourceConfig(builtin="pydoc"), SourceConfig(path=str(corpus / "*.txt"))]


def split_copy(work: Path) -> None:
    """The streamed sources' documents dealt round robin to SPLIT_FILES files each (the
    layout of a corpus stored as many shards)."""
    from data.sources import _builtin_file

    out = work / "split"
    out.mkdir()
    pydoc = _builtin_file("pydoc").read_text().splitlines(keepends=True)
    prose = [
        line
        for name in sorted((ROOT / "tests" / "data" / "corpus").glob("*.txt"))
        for line in name.read_text().splitlines(keepends=True)
    ]
    for name, docs, suffix in (("pydoc", pydoc, "jsonl"), ("prose", prose, "txt")):
        files = SPLIT_FILES[name]
        for i in range(files):
            (out / f"{name}_{i:04d}.{suffix}").write_text("".join(docs[i::files]))


def per_rank(tokenizer, shape: str, kind: str, work: Path, dp: int, steps: int) -> dict:
    """Rank 0 of ``dp``: seconds and data work per step (after one warm-up step)."""
    from data.config import DataConfig
    from data.loader import PretrainLoader

    seq, batch = SHAPES[shape]
    cfg = DataConfig(sources=sources(kind, work), shuffle_buffer=batch, prefetch=0)
    loader = PretrainLoader(cfg, tokenizer, seq, batch, dp_rank=0, dp_size=dp)
    next(loader)
    chars, tokens, docs = loader.chars_tokenized, loader.tokens_read, loader.documents_scanned
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    seconds = (time.perf_counter() - start) / steps
    return {
        "s": seconds,
        "chars": (loader.chars_tokenized - chars) / steps,
        "tokens": (loader.tokens_read - tokens) / steps,
        "scanned": (loader.documents_scanned - docs) / steps,
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


def open_cost(work: Path) -> float:
    """Seconds to start reading one file of a source split by file (rewind to its start and
    read its first document), as a lane group does at each of its files."""
    from data.sources import documents, open_source, units

    (src,) = sources("split", work)[1:]
    files = units(src, open_source(src))
    starts = [unit.state_dict() for unit in files]
    start = time.perf_counter()
    for unit, state in zip(files, starts, strict=True):
        unit.load_state_dict(state)
        next(documents(src, unit))
    return (time.perf_counter() - start) / len(files)


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
    tokenizer = build_tokenizer(tok_cfg, sources("streamed", work))
    start = time.perf_counter()
    prepare_sources(
        DataConfig(sources=sources("streamed", work), tokenizer=tok_cfg),
        work / "prepared",
        PrepareOptions(parts=2),
    )
    print(f"prepared {work / 'prepared'} in {time.perf_counter() - start:.1f} s (1 process)")
    split_copy(work)
    print(f"split copy {work / 'split'}: pydoc in {SPLIT_FILES['pydoc']} files, prose in "
          f"{SPLIT_FILES['prose']} files\n")  # fmt: skip
    kinds = ("streamed", "split", "prepared")

    print("1) data-path tokens/s on one core (rank 0 of DP=1 builds the whole global batch)")
    print(f"{'shape':6} {'source':9} {'tokens/s':>10} {'x GPU 150K/s':>12}")
    single = {}
    for shape in SHAPES:
        for name in kinds:
            r = per_rank(tokenizer, shape, name, work, 1, args.steps)
            single[shape, name] = r
            rate = r["rows_tokens"] / r["s"]
            print(f"{shape:6} {name:9} {rate:10,.0f} {rate / GPU_TOKENS_PER_S:12.2f}")

    print("\n2) per-rank work per step, rank 0 (today: every rank does the DP=1 work)")
    print(
        f"{'shape':6} {'source':9} {'DP':>3} {'work/step':>12} {'today':>12} {'ratio':>6} "
        f"{'scanned':>8} {'ratio':>6} {'s/step':>8} {'today s':>8}"
    )
    measured: dict[str, list[dict]] = {}  # 125m rows, for the per-unit costs of table 4
    for shape in SHAPES:
        for name in kinds:
            key = "tokens" if name == "prepared" else "chars"
            base = single[shape, name]
            for dp in (1, 2, 4, 8):
                r = base if dp == 1 else per_rank(tokenizer, shape, name, work, dp, args.steps)
                scan_ratio = r["scanned"] / base["scanned"] if base["scanned"] else 0.0
                print(
                    f"{shape:6} {name:9} {dp:3d} {r[key]:12,.0f} {base[key]:12,.0f} "
                    f"{r[key] / base[key]:6.3f} {r['scanned']:8,.0f} {scan_ratio:6.3f} "
                    f"{r['s']:8.4f} {base['s']:8.4f}"
                )
                if shape == "125m":
                    measured.setdefault(name, []).append({**r, "rows": SHAPES[shape][1] // dp})

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
    # Per-unit costs, measured: the scan of one raw document; the start of one file (split
    # sources); a lane-sample of the 125m shape (its own documents tokenized, or read from
    # shards, packed, mixed, shuffled): the mean over DP = 1..8 of (s/step - documents
    # scanned x scan cost) / rows, so that the scan is not counted twice.
    scan_s, doc_tokens = scan_cost(tokenizer)
    open_s = open_cost(work)
    per_lane = {
        name: float(np.mean([(r["s"] - r["scanned"] * scan_s) / r["rows"] for r in rows]))
        for name, rows in measured.items()
    }
    print(
        f"per unit: scan of one raw document {scan_s * 1e6:.1f} us; start of one file "
        f"{open_s * 1e3:.2f} ms; lane-sample of {SHAPES['125m'][0] + 1} tokens: "
        + ", ".join(f"{name} {cost * 1e3:.2f} ms" for name, cost in per_lane.items())
    )
    print(
        f"documents of {doc_tokens:,.0f} tokens here (prose lines), 1,000 assumed for a web "
        f"corpus; a rank also scans the held-out documents (1 in {HOLDOUT}); split: a file "
        f"start every {DOCS_PER_FILE:,} documents (files of that many documents assumed)"
    )
    # A streamed source in one order: every rank scans the documents of all the lanes.
    # Split by file over F files (the corpus's own layout: F shards on disk or on the hub):
    # a rank scans those of the lane groups its rows fall in, max(rows, lanes / min(F,
    # lanes)) lanes' worth, and uses the split path's own lane-sample cost (pessimistic:
    # here it includes starting the copy's 27-line files ~3 times per lane-sample).
    # "cores": how many cores at this per-core rate a rank would need for 10x 150K/s.
    seq, lanes = 2048, 512
    print(f"{'source':9} {'files':>5} {'doc tok':>7} {'DP':>4} {'rows':>4} {'scanned':>9} "
          f"{'ms/step':>8} {'tokens/s':>11} {'x 150K/s':>8} {'cores':>5}")  # fmt: skip
    cases = [("streamed", None, t) for t in (doc_tokens, 1000.0)]
    cases += [("split", f, t) for f in SPLIT_FILES_350M for t in (doc_tokens, 1000.0)]
    cases += [("prepared", None, None)]
    lane_tokens = SHAPES["125m"][0] + 1
    for name, files, tokens_per_doc in cases:
        for dp in (64, 512):
            rows = lanes // dp
            seconds = rows * per_lane[name] * (seq + 1) / lane_tokens
            docs = 0.0
            if tokens_per_doc:
                scanned_lanes = lanes if files is None else max(rows, lanes / min(files, lanes))
                docs = scanned_lanes * (seq + 1) / tokens_per_doc * HOLDOUT / (HOLDOUT - 1)
                per_doc = scan_s + (open_s / DOCS_PER_FILE if files else 0.0)
                seconds += docs * per_doc
            rate = rows * (seq + 1) / seconds
            label = f"{tokens_per_doc:7,.0f}" if tokens_per_doc else f"{'-':>7}"
            shown = f"{files:5d}" if files else f"{'-':>5}"
            cores = math.ceil(10 * GPU_TOKENS_PER_S / rate)
            print(
                f"{name:9} {shown} {label} {dp:4d} {rows:4d} {docs:9,.0f} {seconds * 1e3:8.2f} "
                f"{rate:11,.0f} {rate / GPU_TOKENS_PER_S:8.1f} {cores:5d}"
            )
    print(f"\n(work files under {work})")


if __name__ == "__main__":
    main()
