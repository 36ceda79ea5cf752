"""The first GPU check: bf16 training throughput, model FLOP/s, MFU and peak memory of SeqBoat
(router, and forced activation ratios 1.0 / 0.5 / 0.25) against a Transformer baseline of
about the same parameter count; with two or more GPUs also TP2 and DP2 on NCCL.

What one run measures, on one device, for each config (default configs/125m.yaml and
configs/350m.yaml, their model shapes) and each sequence length L (default 2048 and 8192):

  router        SeqBoat with its learned router (``model.routing=sparse``);
  forced-1.0    every token runs the GAU (``model.routing=always``);
  forced-0.5    exactly round(0.5 L) tokens of each sequence activated, chosen at random by a
  forced-0.25   seeded generator: ``Router.forward`` is replaced in this process only (the
                gate stays the router's differentiable probability, as in Router.forward);
  transformer   pretrain/model/transformer.py with the SeqBoat model's width, head size 64,
                and layers / FFN width chosen so the parameter counts agree (both printed).

Each row: a fresh model (fp32 master weights, random init, seed fixed) and the project's AdamW
(``pretrain.build.optimizer_for``, the config's lr and weight decay, gradient clipping as the
Trainer does), ``--warmup`` untimed steps, then ``--steps`` timed training steps under
``torch.autocast(device, bfloat16)`` on random token ids (vocabulary 32000; no data, no
tokenizer), CUDA-synchronised; then one untimed step with ``collect_stats=True`` for the
measured per-layer activation ratios. The micro-batch defaults to the config's, scaled by
2048 / L (the same tokens per step at every length). Columns:

  tok/s         training tokens per second (inputs, batch x L) over the timed steps;
  TF/s          model TFLOP/s from ``pretrain.flops.training_flops_per_token``, "dense"
                (every token through the GAU) and "act" (at the measured activation ratios);
  MFU           TF/s over ``--peak-tflops`` (default 989, an H100's dense bf16, on CUDA;
                n/a on a CPU unless given);
  peak MiB      torch.cuda.max_memory_allocated, reset per row (CPU: the process's peak RSS);
  vs Tfm        tok/s over the Transformer's at the same config and L.

A row that runs out of GPU memory prints OOM and the check goes on; a row that fails otherwise
prints its traceback and ERROR, the check goes on and exits with status 1. With two or more CUDA
GPUs, three small ``python -m pretrain train`` runs on NCCL (torchrun, 2 processes: TP2,
TP2 with sequence parallelism, DP2) must follow one process's loss and gradient-norm curves,
as tests/test_torchrun.py checks on gloo; with fewer GPUs that part is skipped (said so).

    python bench/gpu_check.py                  # the full check on a CUDA GPU: a few minutes
    python bench/gpu_check.py --tiny           # CPU smoke test with tiny shapes (what CI runs)
    python bench/gpu_check.py --configs configs/125m.yaml --lengths 4096 --micro-batch 2

Results go into bench/RESULTS.md with the table as printed, the device named (the output's
first lines give the device, torch version, commit and command line).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(ROOT))

VOCAB = 32000
TINY_VOCAB = 512
H100_BF16_TFLOPS = 989.0
CONFIGS = ["configs/125m.yaml", "configs/350m.yaml"]
TINY_MODEL = [
    "model.layers=2", "model.width=64", "model.zdim=16", "model.hdim=128", "model.window=16",
]  # fmt: skip
KINDS = ("router", "forced-1.0", "forced-0.5", "forced-0.25", "transformer")
FORCED_RATIOS = {"forced-0.5": 0.5, "forced-0.25": 0.25}
SEED = 1234


# --------------------------------------------------------------------------- forced routing


def forced_mask(shape: tuple[int, ...], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` (tokens first, e.g. [L, B]) with exactly round(ratio * L)
    True entries along the token axis for every other index, chosen at random."""
    import torch

    keep = round(ratio * shape[0])
    scores = torch.rand(shape, generator=generator, device=generator.device)
    chosen = scores.topk(keep, dim=0).indices
    return torch.zeros(shape, dtype=torch.bool, device=generator.device).scatter_(0, chosen, True)


def forced_router_forward(ratio: float, seed: int = SEED) -> Callable:
    """A replacement for ``Router.forward``: the decision activates exactly round(ratio * L)
    tokens of each sequence (one seeded generator per device, drawing anew at every call);
    the gate is Router.forward's: the tempered probability of "activate" on activated tokens,
    0 elsewhere, differentiable in the logits and the temperature."""
    import torch

    generators: dict = {}

    def forward(self, logits):
        u = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        generator = generators.get(u.device)
        if generator is None:
            generator = torch.Generator(device=u.device).manual_seed(seed)
            generators[u.device] = generator
        activated = forced_mask(tuple(u.shape[:-1]), ratio, generator)
        skip = u[..., 0] + self.act_bias
        prob = torch.softmax(torch.stack([skip, u[..., 1]], -1) / self.log_temp.exp(), dim=-1)
        gate = torch.where(activated, prob[..., 1], torch.zeros_like(prob[..., 1]))
        return activated, gate.to(logits.dtype)

    return forward


@contextlib.contextmanager
def forced_routing(ratio: float | None, seed: int = SEED) -> Iterator[None]:
    """Within the block every ``Router`` of this process activates ``ratio`` of the tokens
    (None: the router decides, nothing is replaced)."""
    from pretrain.model.router import Router

    if ratio is None:
        yield
        return
    original = Router.forward
    Router.forward = forced_router_forward(ratio, seed)
    try:
        yield
    finally:
        Router.forward = original


# --------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Spec:
    """One row to measure."""

    config: str  # label: the config file's stem
    kind: str
    length: int
    batch: int
    cfg: object  # pretrain.config.Config
    vocab: int
    ratio: float | None = None  # forced activation ratio (None: not forced)


@dataclasses.dataclass
class Row:
    spec: Spec
    params: int
    failure: str | None = None  # "OOM" or "ERROR": no measurement
    tokens_per_s: float = math.nan
    tflops_dense: float = math.nan
    tflops_act: float = math.nan
    act_ratio: float | None = None
    memory_mib: float = math.nan
    final_loss: float = math.nan


def count_params(model_cfg, vocab: int) -> int:
    """Parameters of the whole LM, built on the meta device (no memory, no init time)."""
    import torch

    from pretrain.model.lm import LanguageModel

    with torch.device("meta"):
        return sum(p.numel() for p in LanguageModel(model_cfg, vocab).parameters())


def match_transformer(model_cfg, vocab: int) -> tuple[list[str], int, int]:
    """Overrides for a Transformer baseline with the SeqBoat model's width and embedding,
    head size 64 and about its parameter count: layers from a 4D FFN, then the FFN width
    (a multiple of 64) solved for the rest. Returns (overrides, SeqBoat count, baseline's)."""
    replace = dataclasses.replace
    d = model_cfg.width
    heads = d // 64 if d % 64 == 0 else 1
    base = replace(model_cfg, arch="transformer", transformer_heads=heads, transformer_ffn=4 * d)
    target = count_params(model_cfg, vocab)
    one = count_params(replace(base, layers=1), vocab)
    per_layer = count_params(replace(base, layers=2), vocab) - one
    shell = one - per_layer  # embedding, final norm
    layers = max(1, round((target - shell) / per_layer))
    per_ffn = count_params(replace(base, layers=1, transformer_ffn=4 * d + 1), vocab) - one
    fixed = per_layer - per_ffn * 4 * d  # a layer's parameters apart from its FFN
    ffn = (target - shell) / layers - fixed
    ffn = max(64, round(ffn / per_ffn / 64) * 64)
    overrides = [
        "model.arch=transformer", f"model.layers={layers}", f"model.transformer_heads={heads}",
        f"model.transformer_ffn={ffn}",
    ]  # fmt: skip
    baseline = replace(base, layers=layers, transformer_ffn=ffn)
    return overrides, target, count_params(baseline, vocab)


def kind_overrides(kind: str, transformer: list[str]) -> list[str]:
    if kind == "transformer":
        return transformer
    return ["model.routing=always" if kind == "forced-1.0" else "model.routing=sparse"]


def plan(args: argparse.Namespace) -> tuple[list[Spec], list[str]]:
    """Every row's validated config (a bad one fails here, before any measurement), and one
    line per config comparing the SeqBoat and Transformer parameter counts."""
    from pretrain.config import load_config

    vocab = TINY_VOCAB if args.tiny else VOCAB
    shape = TINY_MODEL if args.tiny else []
    common = ["wandb.mode=disabled", "optimizer.name=adamw", *shape]
    specs, notes = [], []
    for path in args.configs:
        label = Path(path).stem
        base = load_config(path, common)
        transformer, n_seqboat, n_transformer = match_transformer(base.model, vocab)
        m = base.model
        t = dict(o.removeprefix("model.").split("=") for o in transformer[1:])
        notes.append(
            f"{label}: SeqBoat {n_seqboat / 1e6:.2f}M params ({m.layers} layers, D={m.width}, "
            f"Z={m.zdim}, H={m.hdim}, window {m.window}) vs Transformer "
            f"{n_transformer / 1e6:.2f}M ({t['layers']} layers, D={m.width}, "
            f"{t['transformer_heads']} heads, FFN {t['transformer_ffn']}): "
            f"{100 * (n_transformer / n_seqboat - 1):+.1f}%"
        )
        for length in args.lengths:
            if args.micro_batch:
                batch = args.micro_batch
            elif args.tiny:
                batch = 2
            else:  # the config's tokens per micro-batch at every length
                batch = max(1, base.train.micro_batch_size * base.train.seq_length // length)
            for kind in KINDS:
                overrides = [*common, f"train.seq_length={length}"]
                cfg = load_config(path, overrides + kind_overrides(kind, transformer))
                specs.append(Spec(label, kind, length, batch, cfg, vocab, FORCED_RATIOS.get(kind)))
    return specs, notes


def measure(spec: Spec, args: argparse.Namespace, device) -> Row:
    """Warm-up, timed steps, one statistics step; raises torch.cuda.OutOfMemoryError."""
    import torch

    from pretrain.build import optimizer_for
    from pretrain.flops import training_flops_per_token
    from pretrain.metrics import max_memory_mib
    from pretrain.model.lm import LanguageModel

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    cfg = spec.cfg
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LanguageModel(cfg.model, spec.vocab)
    model.to(device).train()
    row = Row(spec, params=sum(p.numel() for p in model.parameters()))
    optimizer = optimizer_for(model, cfg.optimizer)
    clip = cfg.optimizer.clip_grad
    generator = torch.Generator(device=device).manual_seed(SEED)
    batches = [
        torch.randint(0, spec.vocab, (spec.batch, spec.length + 1), generator=generator,
                      device=device)
        for _ in range(2)
    ]  # fmt: skip

    def step(tokens, collect_stats: bool = False):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss, stats = model.loss(tokens, collect_stats)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return loss.detach(), stats

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with forced_routing(spec.ratio):
        for i in range(args.warmup):
            step(batches[i % 2])
        sync()
        start = time.perf_counter()
        for i in range(args.steps):
            step(batches[i % 2])
        sync()
        elapsed = time.perf_counter() - start
        loss, stats = step(batches[0], collect_stats=True)
    ratios = [float(s.activated.float().mean()) for s in stats] if stats else None
    row.tokens_per_s = args.steps * spec.batch * spec.length / elapsed
    padded = model.padded_vocab
    dense = training_flops_per_token(cfg.model, padded, spec.length)
    activated = training_flops_per_token(cfg.model, padded, spec.length, ratios)
    row.tflops_dense = dense * row.tokens_per_s / 1e12
    row.tflops_act = activated * row.tokens_per_s / 1e12
    row.act_ratio = sum(ratios) / len(ratios) if ratios else None
    row.final_loss = float(loss)
    row.memory_mib = max_memory_mib(device)
    return row


def run_rows(specs: list[Spec], args: argparse.Namespace, device) -> list[Row]:
    import torch

    rows = []
    for i, spec in enumerate(specs, 1):
        began = time.perf_counter()
        failure = None
        try:
            row = measure(spec, args, device)
        except torch.cuda.OutOfMemoryError:
            failure = "OOM"
        except Exception:  # one broken row must not lose the others' numbers
            traceback.print_exc()
            failure = "ERROR"
        # Out of the except block: the traceback's frames (model, optimizer) are gone now.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if failure:
            row = Row(spec, params=count_params(spec.cfg.model, spec.vocab), failure=failure)
        rows.append(row)
        result = row.failure or f"{row.tokens_per_s:,.0f} tok/s"
        if not row.failure and not math.isfinite(row.final_loss):
            result += f" (non-finite loss {row.final_loss})"
        print(
            f"  [{i}/{len(specs)}] {spec.config} {spec.kind} L={spec.length} "
            f"batch={spec.batch}: {result} ({time.perf_counter() - began:.1f} s)",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- the table


def millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e7 else f"{count / 1e6:.4f}M"


def fmt(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "n/a"


def table(rows: list[Row], peak_tflops: float | None) -> list[str]:
    baseline = {
        (r.spec.config, r.spec.length): r.tokens_per_s
        for r in rows
        if r.spec.kind == "transformer" and not r.failure
    }
    cols = [
        ("config", "<"), ("model", "<"), ("L", ">"), ("batch", ">"), ("params", ">"),
        ("act", ">"), ("tok/s", ">"), ("TF/s dense", ">"), ("TF/s act", ">"),
        ("MFU dense", ">"), ("MFU act", ">"), ("peak MiB", ">"), ("vs Tfm", ">"),
    ]  # fmt: skip
    cells = []
    for r in rows:
        s = r.spec
        head = [s.config, s.kind, str(s.length), str(s.batch), millions(r.params)]
        if r.failure:
            cells.append([*head, *[r.failure] * (len(cols) - len(head))])
            continue

        def mfu(tflops: float) -> str:
            return f"{100 * tflops / peak_tflops:.1f}%" if peak_tflops else "n/a"

        base = baseline.get((s.config, s.length), math.nan)
        cells.append([
            *head,
            "-" if r.act_ratio is None else f"{r.act_ratio:.3f}",
            fmt(r.tokens_per_s, ",.0f"), fmt(r.tflops_dense, ".3g"), fmt(r.tflops_act, ".3g"),
            mfu(r.tflops_dense), mfu(r.tflops_act), fmt(r.memory_mib, ",.0f"),
            fmt(r.tokens_per_s / base, ".2f"),
        ])  # fmt: skip
    widths = [max(len(name), *(len(c[i]) for c in cells)) for i, (name, _) in enumerate(cols)]

    def line(values: list[str]) -> str:
        parts = [f"{v:{a}{w}}" for v, (_, a), w in zip(values, cols, widths, strict=True)]
        return " | ".join(parts).rstrip()

    header = line([name for name, _ in cols])
    return [header, "-" * len(header), *(line(c) for c in cells)]


# --------------------------------------------------------------------------- TP2 / DP2 on NCCL

# The layouts of tests/test_torchrun.py that fit two GPUs.
LAYOUTS = {
    "TP2": ["parallel.tensor=2"],
    "TP2+SP": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "DP2": [],
}
# Looser than the gloo test's 1e-5 / 1e-4: CUDA kernels (atomic index_add, split-K GEMMs)
# are not bitwise reproducible even on one GPU.
FIRST_STEP_TOL, CURVE_TOL = 1e-4, 1e-3


def train_run(tmp: Path, name: str, launcher: list[str], extra: list[str]) -> list[dict] | str:
    """The records of a small ``python -m pretrain train`` run, or the failure's output."""
    from pretrain.monitor import read_metrics
    from testing.small_run import SMALL_RUN

    run_dir = tmp / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQBOAT_CACHE_DIR": str(tmp / "cache")}
    cmd = [*launcher, "-m", "pretrain", "train", "--no-progress", f"run.dir={run_dir}"]
    try:
        out = subprocess.run(
            [*cmd, *SMALL_RUN, *extra], cwd=tmp, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timed out after 600 s"
    if out.returncode != 0:
        return f"exit status {out.returncode}:\n{out.stderr[-3000:]}"
    return read_metrics(run_dir / "metrics.jsonl")


def worst_difference(a: list[dict], b: list[dict], key: str) -> tuple[float, float]:
    """(relative difference at the first step, largest over all steps) of ``key``."""
    ca = {r["step"]: r[key] for r in a if key in r}
    cb = {r["step"]: r[key] for r in b if key in r}
    if not ca or list(ca) != list(cb):
        return math.inf, math.inf
    diffs = [abs(ca[s] - cb[s]) / abs(ca[s]) for s in ca]
    return diffs[0], max(diffs)


def parallel_check() -> bool:
    """TP2, TP2+SP and DP2 (torchrun, 2 processes; NCCL on CUDA) against one process."""
    from testing.local import free_ports

    ok = True
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        began = time.perf_counter()
        single = train_run(tmp, "single", [sys.executable], [])
        if isinstance(single, str):
            print(f"  single process: FAILED, {single}")
            return False
        print(f"  single process: {len(single)} records ({time.perf_counter() - began:.0f} s)")
        for name, extra in LAYOUTS.items():
            began = time.perf_counter()
            (port,) = free_ports(1)
            torchrun = [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port),
            ]  # fmt: skip
            records = train_run(tmp, name, torchrun, extra)
            if isinstance(records, str):
                print(f"  {name}: FAILED, {records}")
                ok = False
                continue
            first, worst = worst_difference(single, records, "train/loss")
            _, worst_norm = worst_difference(single, records, "train/grad_norm")
            _, worst_val = worst_difference(single, records, "val/loss")
            passed = first < FIRST_STEP_TOL and max(worst, worst_norm, worst_val) < CURVE_TOL
            ok &= passed
            print(
                f"  {name}: {'PASS' if passed else 'FAIL'}  relative difference to one process: "
                f"step-1 loss {first:.1e} (< {FIRST_STEP_TOL:.0e}), worst loss {worst:.1e}, "
                f"grad norm {worst_norm:.1e}, val loss {worst_val:.1e} (< {CURVE_TOL:.0e}) "
                f"({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
    return ok


# --------------------------------------------------------------------------- main


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, "
            f"{torch.cuda.device_count()} GPU(s) visible)"
        )
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                name = text.split(":", 1)[1].strip()
                break
    return f"CPU: {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' (with uncommitted changes)' if dirty else ''}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes (the CI smoke test)")
    ap.add_argument("--configs", nargs="+", default=None, help=f"default: {' '.join(CONFIGS)}")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="default: 2048 8192")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; tiny 1)")
    ap.add_argument(
        "--micro-batch", type=int, default=None,
        help="sequences per step (default: the config's, x 2048 / L; tiny 2)",
    )  # fmt: skip
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument(
        "--peak-tflops", type=float, default=None,
        help=f"peak TFLOP/s for MFU (default on CUDA: {H100_BF16_TFLOPS:g}, an H100's dense "
        "bf16; on a CPU no MFU unless given)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    args.configs = args.configs or CONFIGS
    args.lengths = args.lengths or ([64, 128] if args.tiny else [2048, 8192])
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.steps < 1 or args.warmup < 0 or (args.micro_batch is not None and args.micro_batch < 1):
        ap.error("--steps and --micro-batch must be positive, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pretrain.config import ConfigError

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda, but torch sees no CUDA device")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if not use_cuda and not args.tiny:
        sys.exit(
            "gpu_check: no CUDA device: the full shapes would take hours on a CPU; "
            "run `python bench/gpu_check.py --tiny` for the CPU smoke test"
        )
    peak_default = use_cuda and args.peak_tflops is None
    peak = H100_BF16_TFLOPS if peak_default else args.peak_tflops
    try:
        specs, notes = plan(args)
    except ConfigError as e:
        sys.exit(f"gpu_check: {e}")

    print(f"device: {describe_device(device)}")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, commit {commit()}")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(
        f"bf16 autocast, fp32 master weights, AdamW; {args.warmup} warm-up + {args.steps} timed "
        f"steps per row; random tokens, vocabulary {specs[0].vocab}; "
        + (f"MFU against {peak:g} TFLOP/s" if peak else "MFU n/a (no --peak-tflops)")
        + (" (an H100's dense bf16; --peak-tflops for another GPU)" if peak_default else "")
    )
    for note in notes:
        print(note)
    print(flush=True)
    rows = run_rows(specs, args, device)
    print()
    print("\n".join(table(rows, peak)))
    print(
        "act: mean measured activation ratio over layers (one step after the timed ones); "
        "TF/s: model TFLOP/s\n(pretrain/flops.py) with every token through the GAU (dense) and "
        "at the measured ratios (act);\nvs Tfm: tok/s over the Transformer's at the same "
        "config and L; peak MiB: "
        + ("torch.cuda.max_memory_allocated per row." if use_cuda else "process peak RSS so far.")
    )

    status = 1 if any(r.failure == "ERROR" for r in rows) else 0

    print("\nTP2 / DP2 equivalence on NCCL:")
    gpus = torch.cuda.device_count() if use_cuda else 0
    if gpus < 2:
        reason = f"{gpus} CUDA GPU visible" if use_cuda else "running on the CPU"
        print(f"  skipped: needs 2 or more CUDA GPUs ({reason})")
        return status
    return status if parallel_check() else 1


if __name__ == "__main__":
    sys.exit(main())
