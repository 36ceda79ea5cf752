"""bench/gpu_check.py: the CPU smoke form (``--tiny``) runs every row to a finite number, and
the forced-ratio router override activates exactly round(ratio * L) tokens per sequence."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_check.py"
KINDS = ["router", "forced-1.0", "forced-0.5", "forced-0.25", "transformer"]
FORCED = {"forced-1.0": 1.0, "forced-0.5": 0.5, "forced-0.25": 0.25}


@functools.cache
def load_bench() -> ModuleType:
    """bench/ is not a package: the module from its file (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("bench_gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_table(stdout: str) -> list[dict[str, str]]:
    """The rows of the results table: header, a rule, then rows up to the first blank line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("config") and "tok/s" in line)
    names = [c.strip() for c in lines[start].split("|")]
    assert set(lines[start + 1]) == {"-"}
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip() or "|" not in line:
            break
        rows.append(dict(zip(names, (c.strip() for c in line.split("|")), strict=True)))
    return rows


def test_tiny_run_prints_every_row() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, str(BENCH), "--tiny"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "device: CPU" in out.stdout and f"torch {torch.__version__}" in out.stdout
    assert "command: python " in out.stdout and "--tiny" in out.stdout
    rows = parse_table(out.stdout)
    found = {(r["config"], r["model"], int(r["L"])) for r in rows}
    expected = {(c, k, n) for c in ("125m", "350m") for k in KINDS for n in (64, 128)}
    assert found == expected and len(rows) == len(expected)
    for r in rows:
        what = f"{r['config']} {r['model']} L={r['L']}"
        tokens_per_s = float(r["tok/s"].replace(",", ""))
        assert math.isfinite(tokens_per_s) and tokens_per_s > 0, what
        for key in ("TF/s dense", "TF/s act", "vs Tfm", "peak MiB"):
            assert math.isfinite(float(r[key].replace(",", ""))), (what, key, r[key])
        assert r["MFU dense"] == r["MFU act"] == "n/a"  # a CPU and no --peak-tflops
        if r["model"] in FORCED:  # the forced rows measured the ratio they were forced to
            assert float(r["act"]) == FORCED[r["model"]], (what, r["act"])
        if r["model"] == "transformer":
            assert r["act"] == "-" and r["vs Tfm"] == "1.00"
            assert r["TF/s dense"] == r["TF/s act"]
        else:  # fewer activated tokens, fewer FLOPs counted
            assert float(r["TF/s act"]) <= float(r["TF/s dense"]), what
    # The parameter-matched baseline is reported, and the two-GPU part says why it skipped.
    assert out.stdout.count("vs Transformer") == 2
    assert "skipped: needs 2 or more CUDA GPUs (running on the CPU)" in out.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [64, 37])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1])
def test_forced_router_activates_exact_count(ratio: float, length: int, dtype) -> None:
    from pretrain.model.router import Router

    bench = load_bench()
    original = Router.forward
    router = Router(16)
    logits = torch.randn(length, 3, 2).to(dtype).requires_grad_()
    with bench.forced_routing(ratio, seed=7):
        activated, gate = router(logits)
        second, _ = router(logits)
    assert Router.forward is original  # restored
    expected = round(ratio * length)
    assert activated.dtype == torch.bool and activated.shape == (length, 3)
    assert activated.sum(0).tolist() == [expected] * 3
    assert second.sum(0).tolist() == [expected] * 3
    if 0 < expected < length:  # drawn anew at every call, at random per sequence
        assert not torch.equal(activated, second)
        assert not torch.equal(activated[:, 0], activated[:, 1])
    with bench.forced_routing(ratio, seed=7):  # a fixed generator: the same draw again
        assert torch.equal(router(logits)[0], activated)
    # The gate is Router.forward's: the tempered "activate" probability, 0 where skipped.
    assert gate.dtype == dtype
    u = logits.float()
    prob = torch.softmax(torch.stack([u[..., 0], u[..., 1]], -1) / router.log_temp.exp(), -1)
    assert torch.allclose(gate[activated].float(), prob[..., 1][activated].to(dtype).float())
    assert (gate[~activated] == 0).all()
    gate.float().sum().backward()
    assert logits.grad[activated].abs().sum() > 0 and router.log_temp.grad is not None


def test_forced_routing_in_the_language_model() -> None:
    from pretrain.config import ModelConfig
    from pretrain.model.lm import LanguageModel

    bench = load_bench()
    torch.manual_seed(0)
    cfg = ModelConfig(layers=2, width=32, zdim=8, hdim=32, ndim=4, window=8, routing="sparse")
    model = LanguageModel(cfg, 64)
    tokens = torch.randint(0, 64, (2, 41))
    with bench.forced_routing(0.25):
        loss, stats = model.loss(tokens, collect_stats=True)
    loss.backward()
    assert len(stats) == 2
    for s in stats:
        assert s.activated.sum(0).tolist() == [round(0.25 * 40)] * 2
    assert all(layer.router.log_temp.grad is not None for layer in model.layers)
