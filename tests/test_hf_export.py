"""`seqboat export`: the Hugging Face folder loads without this project, gives the project's
logits, generates greedily what `seqboat generate` does (with its O(1) cache and without),
and its tokenizer encodes and decodes like ours. Bad input is one error line each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.hf.export import export, load_checkpoint
from pretrain.model.decode import generate
from pretrain.train import Trainer
from testing.local import free_ports
from testing.small_run import SMALL_RUN

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 64
TEXTS = [
    "The with statement\nis used to wrap the execution of a block.",
    "  indented  code\tand tabs; ünïcödé → ✓, a literal \u2581 and </s> stay text",
    "",
]

# Run in a fresh interpreter: the project is not importable there (its editable-install
# finder is removed, its packages and megatron-core/DeepSpeed are blocked), its folder is
# not on sys.path, and the working directory is elsewhere.
LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    import torch

    ROOT, BLOCKED = sys.argv[1], {"pretrain", "parallel", "data", "megatron", "deepspeed"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not available here")

    sys.meta_path[:] = [Block()] + [f for f in sys.meta_path if "editable" not in repr(f)]
    assert not any(p and ROOT in p for p in sys.path), sys.path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for folder, job in json.loads(sys.argv[2]).items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        ids = torch.tensor(job["tokens"])
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
            # The cache: a prefill, then one token at a time.
            k = job["prefill"]
            first = model(ids[:, :k], use_cache=True)
            cache, stepped = first.cache, [first.logits]
            for i in range(k, ids.shape[1]):
                step = model(ids[:, i : i + 1], cache=cache, use_cache=True)
                cache = step.cache
                stepped.append(step.logits)
        prompt = tok(job["prompt"], return_tensors="pt").input_ids
        greedy = {
            name: model.generate(
                prompt, max_new_tokens=job["new_tokens"], do_sample=False, use_cache=use
            )[0, prompt.shape[1]:].tolist()
            for name, use in (("cached", True), ("uncached", False))
        }
        out[folder] = {
            "full": full, "stepped": torch.cat(stepped, 1), "greedy": greedy,
            "prompt_ids": prompt[0].tolist(),
            "encoded": [tok(t).input_ids for t in job["texts"]],
            "decoded": [tok.decode(i) for i in job["decode"]],
            "modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
        }
    torch.save(out, sys.argv[3])
    """
)


def run_loader(tmp: Path, jobs: dict[str, dict]) -> dict[str, dict]:
    (tmp / "iso").mkdir(exist_ok=True)
    script = tmp / "iso" / "load_folder.py"
    script.write_text(LOADER)
    results = tmp / "iso" / "results.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")} | {
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(ROOT), json.dumps(jobs), str(results)],
        cwd=tmp / "iso", env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(results, weights_only=False)


def job(folder: Path, run_dir: Path, prompt: str) -> tuple[dict, torch.Tensor, list[int]]:
    """What the loader runs on ``folder``, and the project's logits and greedy tokens."""
    trained = load_checkpoint(run_dir)
    model, tok = trained.model, trained.tokenizer
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tok.vocab_size, (2, 48), generator=g)
    with torch.no_grad():
        logits, _ = model(tokens)
    ours = logits.transpose(0, 1)[..., : tok.vocab_size]
    greedy = generate(model, tok.encode(prompt), NEW_TOKENS, temperature=0, eos_id=tok.eos_id)
    spec = {
        "tokens": tokens.tolist(), "prefill": 40, "prompt": prompt, "new_tokens": NEW_TOKENS,
        "texts": TEXTS, "decode": [tok.encode(t) for t in TEXTS],
    }  # fmt: skip
    return spec, ours, greedy


def check_folder(got: dict, ours: torch.Tensor, greedy: list[int], tok, prompt: str) -> None:
    assert got["modules"] == []  # nothing of the project (or megatron-core) was imported
    assert got["prompt_ids"] == tok.encode(prompt)
    assert (got["full"] - ours).abs().max() < 1e-5
    assert (got["stepped"] - ours).abs().max() < 1e-5  # prefill, then decoding steps
    # Greedy decoding stops at the end of document (HF pads after it; ours stops).
    cached, uncached = (got["greedy"][k][: len(greedy)] for k in ("cached", "uncached"))
    assert cached == greedy and uncached == greedy
    assert len(greedy) == NEW_TOKENS or greedy[-1] == tok.eos_id
    assert got["encoded"] == [tok.encode(t) for t in TEXTS]
    assert got["decoded"] == TEXTS


def tiny_run(run_dir: Path, tokenizer: Path, *overrides: str) -> Path:
    cfg = load_config(
        None,
        [
            f"run.dir={run_dir}", "wandb.mode=disabled",
            f"data.tokenizer.path={tokenizer}", "data.tokenizer.vocab_size=512",
            "data.tokenizer.train_bytes=100000", "data.shuffle_buffer=8",
            "model.layers=2", "model.width=32", "model.zdim=8", "model.hdim=32",
            "model.window=8", "train.seq_length=64", "train.micro_batch_size=4",
            "train.global_batch_size=8", "train.max_steps=6", "train.log_interval=3",
            "train.eval_interval=3", "train.eval_samples=4", "checkpoint.interval=3",
            "optimizer.warmup_steps=2", *overrides,
        ],
    )  # fmt: skip
    Trainer(cfg, progress=False).train()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf_runs")
    tokenizer = tmp / "tok512.model"  # trained once, shared by the three runs
    return {
        routing: tiny_run(tmp / routing, tokenizer, f"model.routing={routing}")
        for routing in ("sparse", "always", "never")
    }


def test_exported_folder_equals_the_project_without_it(runs, tmp_path: Path, capsys) -> None:
    prompt = "The with statement"
    jobs, expected = {}, {}
    for routing, run_dir in runs.items():
        folder = tmp_path / f"hf_{routing}"
        # "always" is written in shards of ~30 kB: the index and shards load the same.
        shard = ["--max-shard-size", "30000"] if routing == "always" else []
        assert main(["export", "--run-dir", str(run_dir), "--out", str(folder), *shard]) == 0
        spec, ours, greedy = job(folder, run_dir, prompt)
        jobs[str(folder)], expected[str(folder)] = spec, (ours, greedy)
    assert (tmp_path / "hf_always" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "hf_sparse" / "model.safetensors.index.json").exists()
    results = run_loader(tmp_path, jobs)
    tok = load_checkpoint(runs["sparse"]).tokenizer
    for folder, (ours, greedy) in expected.items():
        check_folder(results[folder], ours, greedy, tok, prompt)
    # `seqboat generate` greedy prints the same continuation.
    capsys.readouterr()
    argv = ["--run-dir", str(runs["sparse"]), "--prompt", prompt, "--temperature", "0"]
    assert main(["generate", *argv, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    cached = results[str(tmp_path / "hf_sparse")]["greedy"]["cached"]
    assert printed == prompt + tok.decode(cached[: len(expected[str(tmp_path / "hf_sparse")][1])])


def test_model_card_and_step_choice(runs, tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    trained = export(runs["sparse"], folder, step=3)
    assert trained.step == 3
    card = (folder / "README.md").read_text()
    assert "step 3" in card and f"training tokens: {3 * 8 * 64:,}" in card
    metrics = [json.loads(line) for line in (runs["sparse"] / "metrics.jsonl").open()]
    val = next(r for r in metrics if r.get("step") == 3 and "val/loss" in r)
    assert f"loss {val['val/loss']:.4f}" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["seqboat"]["routing"] == "sparse" and config["vocab_size"] == 512


def one_error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqboat: error: "), err
    return err[0]


def test_bad_input_is_one_line_and_writes_nothing(
    runs, tmp_path: Path, capsys, monkeypatch
) -> None:
    run_dir = runs["never"]
    out = tmp_path / "out"
    base = ["export", "--run-dir", str(run_dir), "--out", str(out)]
    # A run directory without a checkpoint.
    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    line = one_error_line(capsys, ["export", "--run-dir", str(empty), "--out", str(out)])
    assert "has no checkpoint yet" in line
    # A step that was not saved.
    line = one_error_line(capsys, [*base, "--step", "5"])
    assert "no checkpoint of step 5 (it has: 3, 6)" in line
    assert not out.exists()
    # An output folder that is not empty: refused, untouched; --force replaces it.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(capsys, base)
    assert "is not empty (--force replaces it)" in line and (out / "keep.txt").exists()
    assert main([*base, "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    # The run's sentencepiece model is not where its config says: refused (a new tokenizer
    # would be trained otherwise).
    moved = tmp_path / "moved"
    shutil.copytree(runs["sparse"], moved)
    config = (moved / "config.yaml").read_text()
    tokenizer_path = yaml.safe_load(config)["data"]["tokenizer"]["path"]
    (moved / "config.yaml").write_text(config.replace(tokenizer_path, str(tmp_path / "no.model")))
    line = one_error_line(capsys, ["export", "--run-dir", str(moved), "--out", str(out), "--force"])
    assert "no.model is not there" in line and not (tmp_path / "no.model").exists()
    # A missing optional dependency: what to install, in one line.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    line = one_error_line(capsys, [*base, "--force"])
    assert "needs safetensors: pip install -c constraints.txt -e '.[hf]'" in line


@pytest.mark.slow
def test_tensor2_pipeline2_checkpoint_exports(tmp_path: Path) -> None:
    """A checkpoint written by 4 ranks (tensor 2 x pipeline 2) exports to the same model."""
    run_dir = tmp_path / "tp2pp2"
    (port,) = free_ports(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQBOAT_CACHE_DIR": str(tmp_path / "cache")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "pretrain", "train",
        "--no-progress", f"run.dir={run_dir}", *SMALL_RUN, "parallel.tensor=2",
        "parallel.pipeline=2", "train.max_steps=4", "checkpoint.interval=4",
        "train.eval_interval=4",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(next((run_dir / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["layout"] == {"tp_size": 2, "cp_size": 1, "dp_size": 1, "pp_size": 2}
    folder = tmp_path / "hf"
    export(run_dir, folder)
    prompt = "The with statement"
    spec, ours, greedy = job(folder, run_dir, prompt)
    got = run_loader(tmp_path, {str(folder): spec})[str(folder)]
    check_folder(got, ours, greedy, load_checkpoint(run_dir).tokenizer, prompt)


@pytest.mark.parametrize(
    "overrides",
    [
        {"position": "rotary"},
        {"position": "simple", "attention_fn": "relu2"},
        {"position": "local", "prenorm": False, "ffn_hidden": 16},
        {"routing": "always"},
        {"routing": "never"},
        {"arch": "transformer", "transformer_heads": 4},
    ],
)
def test_prefilled_cache_continues_like_the_full_forward(overrides: dict) -> None:
    """The cache filled by one parallel forward (SeqBoat: EMA states and the ring of the last
    window activated keys/values read off it; the baseline: its keys/values) continues token
    by token exactly as the full forward over the whole text (float64)."""
    from pretrain.config import ModelConfig
    from pretrain.hf.cache import cache_for
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    cfg = ModelConfig(layers=2, width=32, zdim=8, hdim=16, window=5, **overrides)
    model = LanguageModel(cfg, 100).double().eval()
    tokens = torch.randint(0, 100, (2, 90))
    with torch.no_grad():
        full, stats = model(tokens, collect_stats=True)
    cache = cache_for(model, 2)
    prefix = cache.forward(model, tokens[:, :60])  # > window activated tokens when sparse
    rest = [cache.forward(model, tokens[:, i : i + 1]) for i in range(60, 90)]
    got = torch.cat([prefix, *rest])
    assert (got - full).abs().max() / full.abs().max() < 1e-10
    if cfg.routing == "sparse" and cfg.arch == "seqboat":  # the ring really wraps around
        count = stats[0].activated[:60].sum(0)
        assert (count > cfg.window).all() and (count < 60).all()
