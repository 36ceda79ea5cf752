"""``load_trained`` (``seqboat eval``, ``generate``, ``export``, the plots) uses the run's own
sentencepiece model, whatever the working directory: a relative ``data.tokenizer.path`` is
found from the folder the run was launched from, and a model that cannot be found is one
``seqboat: error:`` line naming it, never a newly trained tokenizer (a new vocabulary: the
wrong ids, silently)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pretrain.checkpointer import load_trained
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.train import Trainer

TOKENIZER = "runs/tok512.model"  # relative, as in configs/*.yaml


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run launched from its project folder, with relative paths: ``runs/tiny``
    and its tokenizer ``runs/tok512.model``. Returns the project folder."""
    project = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        cfg = load_config(
            None,
            [
                "run.dir=runs/tiny", "wandb.mode=disabled", f"data.tokenizer.path={TOKENIZER}",
                "data.tokenizer.vocab_size=512", "data.tokenizer.train_bytes=100000",
                "data.shuffle_buffer=8", "model.layers=1", "model.width=32", "model.zdim=8",
                "model.hdim=32", "model.window=8", "train.seq_length=32",
                "train.micro_batch_size=2", "train.global_batch_size=2", "train.max_steps=2",
                "train.log_interval=1", "train.eval_interval=2", "train.eval_samples=2",
                "checkpoint.interval=2", "optimizer.warmup_steps=1",
            ],
        )  # fmt: skip
        Trainer(cfg, progress=False).train()
    assert (project / TOKENIZER).is_file()
    return project


def test_the_runs_tokenizer_is_found_from_another_folder(
    launched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another working directory the run's tokenizer is the one beside the run (found
    from where ``run.dir`` puts the run); nothing is trained in the working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg, tokenizer, _, step = load_trained(launched / "runs" / "tiny")
    assert step == 2
    assert Path(cfg.data.tokenizer.path) == launched / TOKENIZER
    assert tokenizer.vocab_size == 512
    assert not (elsewhere / "runs").exists()


def test_a_missing_tokenizer_is_one_error_line_and_none_is_trained(
    launched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A copy of the run elsewhere (its launch folder cannot be told from where it is),
    used from a folder without the tokenizer: ``seqboat generate`` ends with one error line
    naming the missing model, and trains none."""
    moved = tmp_path / "copy" / "tiny-run"
    # Not W&B's folder: its debug-internal.log may be a link to a log that is gone by now.
    shutil.copytree(launched / "runs" / "tiny", moved, ignore=shutil.ignore_patterns("wandb"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(moved), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqboat: error: "), err
    assert f"the run's tokenizer {TOKENIZER} is not there" in err[0]
    assert str(elsewhere / TOKENIZER) in err[0]
    assert not (elsewhere / "runs").exists()
