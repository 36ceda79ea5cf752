"""`seqboat prepare data`: documents -> token shards, parallel, resumable, byte-identical;
training from the shards is training from the streamed source."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig, SourceConfig, TokenizerConfig
from data.loader import PretrainLoader, validation_samples
from data.prepare import PrepareOptions, prepare_sources, split_enwik8
from data.prepared import PreparedDataset
from data.sources import open_source
from data.tokenizer import ByteTokenizer, build_tokenizer
from pretrain.cli import main
from tests.conftest import CORPUS

PROSE = [str(CORPUS / name) for name in ("brown.txt", "moby_dick.txt", "shakespeare.txt")]
# Small shards and blocks so that documents cross shard boundaries and parts interleave.
OPTIONS = PrepareOptions(shard_tokens=5000, block_documents=50, parts=5)
ROOT = Path(__file__).resolve().parents[1]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "prose"
    cfg = DataConfig(sources=[SourceConfig(path=PROSE)], tokenizer=TokenizerConfig(kind="byte"))
    assert prepare_sources(cfg, out, OPTIONS)
    return out


def test_shards_hold_the_documents_with_eos(prepared: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    docs = [example["text"] for example in open_source(SourceConfig(path=PROSE))]
    assert manifest["documents"] == len(docs) and manifest["dtype"] == "uint16"
    assert manifest["tokens"] == sum(len(d.encode()) + 1 for d in docs)
    shards = [s for part in manifest["parts"] for s in part["shards"]]
    assert len(shards) > 2 * OPTIONS.parts
    assert all(s["tokens"] <= OPTIONS.shard_tokens for s in shards)
    dataset = PreparedDataset(prepared)
    for d in (0, 49, 50, 51, 777, len(docs) - 1):
        assert bytes(dataset.document(d).tolist()).decode() == docs[d]


def sentencepiece_config(tmp_path: Path) -> TokenizerConfig:
    return TokenizerConfig(path=str(tmp_path / "bpe.model"), vocab_size=400, train_bytes=200_000)


@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_training_from_shards_is_training_from_the_stream(
    tmp_path: Path, prepared: Path, tokenizer: str
) -> None:
    """The same batches and validation samples, alone and mixed with a streamed source."""
    if tokenizer == "byte":
        tok_cfg, tok, shards = TokenizerConfig(kind="byte"), ByteTokenizer(), prepared
    else:
        tok_cfg = sentencepiece_config(tmp_path)
        cfg = DataConfig(sources=[SourceConfig(path=PROSE)], tokenizer=tok_cfg)
        shards = tmp_path / "bpe"
        assert prepare_sources(cfg, shards, OPTIONS)
        tok = build_tokenizer(tok_cfg, cfg.sources)
    sotu = SourceConfig(path=str(CORPUS / "sotu.txt"), weight=0.5)
    for streamed, tokenized in [
        ([SourceConfig(path=PROSE)], [SourceConfig(tokenized=str(shards))]),
        ([SourceConfig(path=PROSE), sotu], [SourceConfig(tokenized=str(shards)), sotu]),
    ]:
        a = DataConfig(sources=streamed, tokenizer=tok_cfg, shuffle_buffer=32)
        b = DataConfig(sources=tokenized, tokenizer=tok_cfg, shuffle_buffer=32)
        la, lb = PretrainLoader(a, tok, 64, 8), PretrainLoader(b, tok, 64, 8)
        assert all(torch.equal(next(la), next(lb)) for _ in range(25))
        assert lb.tokens_read > 0 and lb.chars_tokenized < la.chars_tokenized
        va, vb = validation_samples(a, tok, 64, 40), validation_samples(b, tok, 64, 40)
        assert torch.equal(va, vb)


def test_workers_and_array_tasks_write_the_same_bytes(
    tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["prepare", "data", "data.tokenizer.kind=byte", f"data.sources=[{{path: {PROSE}}}]"]
    sizes = ["--shard-tokens", "5000", "--block-documents", "50", "--parts", "5"]
    assert main([*args, "--out", str(tmp_path / "w"), "--workers", "2", *sizes]) == 0
    assert files(tmp_path / "w") == files(prepared)
    # Two Slurm array tasks (ids 1 and 2): the manifest comes with the task that finishes last.
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    for task in ("2", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert main([*args, "--out", str(tmp_path / "slurm"), *sizes]) == 0
        assert (tmp_path / "slurm" / "manifest.json").is_file() == (task == "1")
    assert files(tmp_path / "slurm") == files(prepared)


@pytest.mark.slow
def test_killed_and_rerun_gives_the_same_files(tmp_path: Path, prepared: Path) -> None:
    """kill -9 once some parts are committed; the same command finishes the rest."""
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "pretrain", "prepare", "data", "data.tokenizer.kind=byte",
        f"data.sources=[{{path: {PROSE}}}]", "--out", str(out), "--shard-tokens", "5000",
        "--block-documents", "50", "--parts", "5",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob("part_*.done.json")):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    committed = len(list(out.glob("part_*.done.json")))
    assert 1 <= committed < OPTIONS.parts and not (out / "manifest.json").exists()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert files(out) == files(prepared), leftovers


def test_bad_shards_are_one_error_naming_them(tmp_path: Path, prepared: Path) -> None:
    cfg = DataConfig(sources=[SourceConfig(tokenized=str(tmp_path / "p"))])
    cfg.tokenizer = TokenizerConfig(kind="byte")
    shutil.copytree(prepared, tmp_path / "p")
    shard = tmp_path / "p" / "part_00001_00002.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"shard .*part_00001_00002\.bin is truncated"):
        PretrainLoader(cfg, ByteTokenizer(), 64, 8)
    # A shard of the same size from another position (say, a copy gone wrong): foreign.
    shutil.copy(tmp_path / "p" / "part_00001_00001.bin", shard)
    with pytest.raises(ValueError, match=r"shard .*part_00001_00002\.bin is foreign"):
        PretrainLoader(cfg, ByteTokenizer(), 64, 8)
    shutil.rmtree(tmp_path / "p")
    with pytest.raises(ValueError, match="is not a prepared token directory"):
        PretrainLoader(cfg, ByteTokenizer(), 64, 8)


def test_shards_of_another_tokenizer_are_refused(
    tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok_cfg = sentencepiece_config(tmp_path)
    tok = build_tokenizer(tok_cfg, [SourceConfig(path=PROSE)])
    cfg = DataConfig(sources=[SourceConfig(tokenized=str(prepared))], tokenizer=tok_cfg)
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        PretrainLoader(cfg, tok, 64, 8)
    # From the command line: one line.
    overrides = [
        "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}", f"data.tokenizer.path={tok_cfg.path}",
        "data.tokenizer.vocab_size=400", f"data.sources=[{{tokenized: {prepared}}}]",
    ]  # fmt: skip
    assert main(["train", "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("seqboat: error: ") and "another tokenizer" in err[-1]


class WideTokenizer(ByteTokenizer):
    """Bytes shifted past 65535: needs uint32 shards."""

    vocab_size, eos_id, fingerprint = 70_000, 69_999, "wide"

    def encode(self, text: str) -> list[int]:
        return [60_000 + b for b in text.encode()]


def test_uint32_when_the_vocabulary_needs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data.prepare

    monkeypatch.setattr(data.prepare, "build_tokenizer", lambda *_: WideTokenizer())
    src = SourceConfig(path=PROSE[0])
    assert prepare_sources(DataConfig(sources=[src]), tmp_path / "w", OPTIONS)
    dataset = PreparedDataset(tmp_path / "w")
    assert dataset.dtype == np.uint32
    first = next(iter(open_source(src)))["text"]
    assert dataset.document(0).tolist() == WideTokenizer().encode(first)


def test_enwik8_is_split_90_5_5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import zipfile

    data = bytes(range(256)) * 4 + b"x" * 976  # 2000 bytes stand in for the 10^8
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as archive:
        archive.writestr("enwik8", data)
    paths = split_enwik8(tmp_path / "enwik8.zip", tmp_path / "out", total=2000)
    assert [p.name for p in paths] == ["train.txt", "valid.txt", "test.txt"]
    assert [p.read_bytes() for p in paths] == [data[:1800], data[1800:1900], data[1900:]]
    # The real command checks the size of the standard file.
    assert main(["prepare", "enwik8", "--zip", str(tmp_path / "enwik8.zip")]) == 2
    err = capsys.readouterr().err
    assert "seqboat: error: " in err and "the standard enwik8 has 100,000,000" in err
