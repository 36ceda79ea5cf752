"""Data at cluster scale: each data-parallel rank does 1/DP of the data work, the global
batches do not depend on DP, and a run resumes exactly on another DP size."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import data.lanes
from data.config import DataConfig, SourceConfig, TokenizerConfig
from data.loader import PretrainLoader, merge_lane_states, validation_samples
from data.prefetch import Prefetcher
from data.prepare import PrepareOptions, prepare_sources
from data.sources import documents
from data.tokenizer import ByteTokenizer
from pretrain.monitor import read_metrics
from testing.local import free_ports, subprocess_env
from testing.small_run import SMALL_RUN
from tests.conftest import CORPUS

SEQ, BATCH, STEPS = 64, 16, 40
# Short-line prose (one document per line): the per-rank work is even at this small scale.
PROSE = [str(CORPUS / name) for name in ("brown.txt", "moby_dick.txt", "shakespeare.txt")]
# PROSE's lines dealt round robin to this many files (so that the files read alike): more
# files than lanes (lane groups of one lane, of one or two files), and fewer (groups of two
# or three lanes sharing a file, straddling the ranks' blocks of lanes at DP = 4 and 8).
MANY_FILES, FEW_FILES = 24, 6


class CountingTokenizer(ByteTokenizer):
    """Bytes, counting the characters it is asked to tokenize."""

    def __init__(self) -> None:
        self.chars = 0

    def encode(self, text: str) -> list[int]:
        self.chars += len(text)
        return super().encode(text)


def streamed() -> DataConfig:
    return DataConfig(sources=[SourceConfig(path=PROSE)], shuffle_buffer=32, seed=3)


def mixture() -> DataConfig:
    return DataConfig(
        sources=[
            SourceConfig(path=PROSE[1:], weight=3.0),
            SourceConfig(path=PROSE[0], weight=1.0),
        ],
        val_fraction=0.25,
        shuffle_buffer=48,
        seed=11,
    )


def prepared(directory: Path) -> DataConfig:
    return DataConfig(sources=[SourceConfig(tokenized=str(directory))], shuffle_buffer=32, seed=3)


def prepared_and_streamed(directory: Path) -> DataConfig:
    cfg = mixture()
    cfg.sources[0] = SourceConfig(tokenized=str(directory), weight=3.0)
    return cfg


def split(directory: Path) -> DataConfig:
    """A streamed source of many files, split over the lanes by file."""
    source = SourceConfig(path=str(directory / "*.txt"), split_files=True)
    return DataConfig(sources=[source], shuffle_buffer=32, seed=3)


def split_and_prepared(prepared_dir: Path, few_files: Path) -> DataConfig:
    cfg = mixture()
    cfg.sources = [
        SourceConfig(tokenized=str(prepared_dir), weight=3.0),
        SourceConfig(path=str(few_files / "*.txt"), split_files=True),
    ]
    return cfg


CONFIGS = {
    "streamed": lambda dirs: streamed(),
    "mixture": lambda dirs: mixture(),
    "prepared": lambda dirs: prepared(dirs["prepared"]),
    "prepared+streamed": lambda dirs: prepared_and_streamed(dirs["prepared"]),
    "split-files": lambda dirs: split(dirs["many"]),
    "split-files+prepared": lambda dirs: split_and_prepared(dirs["prepared"], dirs["few"]),
}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mixture()``'s first source, pre-tokenized (bytes)."""
    out = tmp_path_factory.mktemp("prepared")
    cfg = DataConfig(sources=[SourceConfig(path=PROSE[1:])], tokenizer=TokenizerConfig(kind="byte"))
    assert prepare_sources(cfg, out, PrepareOptions(shard_tokens=4096, block_documents=64, parts=3))
    return out


def deal_lines(out: Path, files: int) -> list[list[str]]:
    """PROSE's non-empty lines dealt round robin to ``files`` files in ``out``; returns
    each file's lines (= its documents)."""
    lines = [line for name in PROSE for line in Path(name).read_text().splitlines()]
    lines = [line for line in lines if line.strip()]
    dealt = [lines[i::files] for i in range(files)]
    for i, part in enumerate(dealt):
        (out / f"part_{i:03d}.txt").write_text("".join(f"{line}\n" for line in part))
    return dealt


@pytest.fixture(scope="module")
def many_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("many_files")
    deal_lines(out, MANY_FILES)
    return out


@pytest.fixture(scope="module")
def few_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("few_files")
    deal_lines(out, FEW_FILES)
    return out


@pytest.fixture(scope="module")
def dirs(prepared_dir: Path, many_files: Path, few_files: Path) -> dict[str, Path]:
    return {"prepared": prepared_dir, "many": many_files, "few": few_files}


def config(name: str, dirs: dict[str, Path]) -> DataConfig:
    return CONFIGS[name](dirs)


def ranks(cfg: DataConfig, dp: int, tokenizer=None) -> list[PretrainLoader]:
    return [
        PretrainLoader(cfg, tokenizer or ByteTokenizer(), SEQ, BATCH, dp_rank=r, dp_size=dp)
        for r in range(dp)
    ]


def global_batches(loaders: list[PretrainLoader], steps: int) -> list[torch.Tensor]:
    return [torch.cat([next(rank) for rank in loaders]) for _ in range(steps)]


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
def test_per_rank_work_falls_as_one_over_dp(dp: int) -> None:
    """Characters tokenized per rank per step, against one rank building the whole batch."""
    cfg = streamed()
    whole = CountingTokenizer()
    (single,) = ranks(cfg, 1, whole)
    for _ in range(STEPS):
        next(single)
    for r in range(dp):
        counter = CountingTokenizer()
        loader = PretrainLoader(cfg, counter, SEQ, BATCH, dp_rank=r, dp_size=dp)
        for _ in range(STEPS):
            next(loader)
        share = counter.chars * dp / whole.chars
        assert 0.85 < share < 1.15, f"rank {r} of {dp} tokenized {share:.2f}/DP of the batch"


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_prepared_tokens_read_per_rank_fall_as_one_over_dp(dp: int, prepared_dir: Path) -> None:
    cfg = prepared(prepared_dir)
    (single,) = ranks(cfg, 1)
    global_batches([single], STEPS)
    assert single.chars_tokenized == 0
    for r in range(dp):
        loader = PretrainLoader(cfg, ByteTokenizer(), SEQ, BATCH, dp_rank=r, dp_size=dp)
        global_batches([loader], STEPS)
        share = loader.tokens_read * dp / single.tokens_read
        assert 0.85 < share < 1.15, f"rank {r} of {dp} read {share:.2f}/DP of the batch"


@pytest.mark.parametrize("name", CONFIGS)
def test_global_batches_do_not_depend_on_dp(name: str, dirs: dict[str, Path]) -> None:
    cfg = config(name, dirs)
    reference = global_batches(ranks(cfg, 1), 12)
    assert all(batch.shape == (BATCH, SEQ + 1) for batch in reference)
    assert len({tuple(row.tolist()) for batch in reference for row in batch}) == 12 * BATCH
    for dp in (2, 4):
        assert all(map(torch.equal, global_batches(ranks(cfg, dp), 12), reference)), dp


@pytest.mark.parametrize("name", CONFIGS)
def test_resume_on_two_ranks_from_four(name: str, dirs: dict[str, Path]) -> None:
    cfg = config(name, dirs)
    expected = global_batches(ranks(cfg, 1), 14)[7:]
    four = ranks(cfg, 4)
    global_batches(four, 7)
    # What a checkpoint holds: the lanes of every rank, gathered.
    saved = roundtrip(merge_lane_states([rank.state_dict() for rank in four]))
    assert sorted(saved["lane_states"]) == list(range(BATCH))
    two = ranks(cfg, 2)
    for rank in two:
        rank.load_state_dict(saved)
    assert all(map(torch.equal, global_batches(two, 7), expected))


def test_a_rank_needs_its_lanes_in_the_state() -> None:
    cfg = streamed()
    four = ranks(cfg, 4)
    global_batches(four, 2)
    partial = four[0].state_dict()  # lanes 0..3 only
    with pytest.raises(ValueError, match=r"lacks lanes \[4, 5, 6, 7\]"):
        ranks(cfg, 4)[1].load_state_dict(partial)
    with pytest.raises(ValueError, match=r"16 lanes .* this run has 8"):
        PretrainLoader(cfg, ByteTokenizer(), SEQ, 8).load_state_dict(partial)


# ------------------------------------------------- streamed sources split over the lanes by file


@pytest.mark.parametrize("files", [MANY_FILES, 8])
@pytest.mark.parametrize("dp", [2, 4, 8])
def test_streamed_documents_scanned_per_rank_fall_as_one_over_dp(
    dp: int, files: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw documents a rank reads from a many-file streamed source (its lanes' and the ones
    it skips), against one rank building the whole batch: 1/DP within 15% when the source is
    split by file. Counted where the readers get their documents (``documents``), so the
    count does not trust the loader's own bookkeeping. (8 files: two lanes share a file.)"""
    deal_lines(tmp_path, files)
    cfg = split(tmp_path)
    scanned = [0]

    def counting(src: SourceConfig, dataset):
        for example in documents(src, dataset):
            scanned[0] += 1
            yield example

    monkeypatch.setattr(data.lanes, "documents", counting)
    steps = 100  # ~1,300 documents in all: enough that each rank's share is even

    def scan(rank: int, size: int) -> int:
        scanned[0] = 0
        loader = PretrainLoader(cfg, ByteTokenizer(), SEQ, BATCH, dp_rank=rank, dp_size=size)
        for _ in range(steps):
            next(loader)
        assert loader.documents_scanned == scanned[0]
        return scanned[0]

    whole = scan(0, 1)
    for r in range(dp):
        share = scan(r, dp) * dp / whole
        assert 0.85 < share < 1.15, f"rank {r} of {dp} read {share:.2f}/DP of the documents"


def test_a_rank_opens_only_its_lanes_files(many_files: Path, tmp_path: Path) -> None:
    """24 files, 16 lanes: lane group ``i`` reads files ``block(24, 16, i)``, so rank 0 of 4
    (lanes 0-3) reads files 0-7 only: the other files, made unreadable, are never opened."""
    for f in sorted(many_files.glob("*.txt")):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    for i in range(8, MANY_FILES):
        (tmp_path / f"part_{i:03d}.txt").write_bytes(b"\xff\xfe not UTF-8\n" * 100)

    def rank(cfg: DataConfig, r: int) -> PretrainLoader:
        return PretrainLoader(cfg, ByteTokenizer(), SEQ, BATCH, dp_rank=r, dp_size=4)

    expected = global_batches([rank(split(many_files), 0)], 30)
    assert all(map(torch.equal, global_batches([rank(split(tmp_path), 0)], 30), expected))
    with pytest.raises(ValueError, match=r"part_008\.txt .* not valid UTF-8"):
        global_batches([rank(split(tmp_path), 1)], 30)


def test_split_source_holds_out_by_document_in_each_file(tmp_path: Path) -> None:
    """Document ``d`` of each file is held out iff ``d % 20 == 19``: the validation samples
    are those documents packed, and no lane's training stream holds one of them."""
    dealt = deal_lines(tmp_path, FEW_FILES)
    cfg = split(tmp_path)
    k = round(1 / cfg.val_fraction)
    held = [line for part in dealt for d, line in enumerate(part) if d % k == k - 1]
    train = {line for part in dealt for d, line in enumerate(part) if d % k != k - 1}
    eos = ByteTokenizer.eos_id
    stream = [t for line in held for t in [*line.encode(), eos]]
    expected = [stream[i * SEQ : (i + 1) * SEQ + 1] for i in range((len(stream) - 1) // SEQ)]
    assert validation_samples(cfg, ByteTokenizer(), SEQ, 10**6).tolist() == expected
    cfg.shuffle_buffer = 0  # each row is then its lane's token stream, cut in samples
    # 100 steps: ~1,600 documents, more than the first file's 1,144 (in one global order,
    # the hold-out rules would differ only after it).
    rows = torch.stack(global_batches(ranks(cfg, 2), 100), dim=1).tolist()  # [lane][step]
    documents: set[str] = set()
    for samples in rows:
        lane = samples[0] + [t for sample in samples[1:] for t in sample[1:]]
        text = bytes(t if t != eos else ord("\n") for t in lane).decode(errors="replace")
        documents.update(text.split("\n")[1:-1])  # whole documents only
    assert len(documents) > 200 and documents <= train
    assert not documents & (set(held) - train)  # (some lines occur more than once)


def test_a_single_file_is_read_as_without_split_files() -> None:
    def single(split_files: bool) -> DataConfig:
        source = SourceConfig(path=PROSE[1], split_files=split_files)
        return DataConfig(sources=[source], shuffle_buffer=32, seed=3)

    reference = global_batches(ranks(single(False), 1), 10)
    assert all(map(torch.equal, global_batches(ranks(single(True), 2), 10), reference))
    assert torch.equal(
        validation_samples(single(True), ByteTokenizer(), SEQ, 8),
        validation_samples(single(False), ByteTokenizer(), SEQ, 8),
    )


def test_a_state_of_another_split_is_refused(many_files: Path) -> None:
    """Turning split_files on or off, or adding files, changes the samples: refused."""
    on = split(many_files)
    off = split(many_files)
    off.sources[0].split_files = False
    loader = ranks(off, 1)[0]
    global_batches([loader], 3)
    saved = roundtrip(loader.state_dict())
    with pytest.raises(ValueError, match=r"read in one order .* split by file over lane groups "
                       r"\(24 files, 16 groups\).*set split_files: false"):  # fmt: skip
        ranks(on, 1)[0].load_state_dict(saved)
    # A state saved before split_files existed has no layouts: every source in one order.
    old = {key: value for key, value in saved.items() if key != "layouts"}
    resumed = ranks(off, 1)[0]
    resumed.load_state_dict(old)
    assert all(map(torch.equal, global_batches([resumed], 3), global_batches([loader], 3)))
    with pytest.raises(ValueError, match=r"read in one order"):
        ranks(on, 1)[0].load_state_dict(old)
    second = ranks(on, 2)[1]  # a state with lanes 8-15
    global_batches([second], 3)
    saved = roundtrip(second.state_dict())
    for cfg, message in [
        (off, r"split by file .* read in one order .* split_files: true"),
        (fewer(many_files), r"\(24 files, 16 groups\).*\(10 files, 10 groups\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            ranks(cfg, 2)[1].load_state_dict(saved)


def fewer(many_files: Path) -> DataConfig:
    """``split(many_files)`` with a glob that finds 10 of its 24 files."""
    cfg = split(many_files)
    cfg.sources[0].path = str(many_files / "part_00*.txt")
    return cfg


def test_a_lane_group_without_documents_is_one_error(tmp_path: Path) -> None:
    deal_lines(tmp_path, 4)
    (tmp_path / "part_001.txt").write_text("  \n\n")  # lanes 4-7 read only this file
    with pytest.raises(ValueError, match=r"no training documents in .*part_001\.txt "
                       r"\(split_files: the only files of lanes 4-7\)"):  # fmt: skip
        PretrainLoader(split(tmp_path), ByteTokenizer(), SEQ, BATCH, dp_rank=1, dp_size=4)


def test_split_files_is_for_streamed_sources(prepared_dir: Path) -> None:
    cfg = prepared(prepared_dir)
    cfg.sources[0].split_files = True
    with pytest.raises(ValueError, match="split_files is for streamed sources"):
        ranks(cfg, 1)


WORKER = """
import io, os, sys
import torch, torch.distributed as dist
from data.config import DataConfig, SourceConfig, TokenizerConfig
from data.loader import PretrainLoader
from tests.test_data_scale import CountingTokenizer, streamed, SEQ, BATCH, STEPS

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
counter = CountingTokenizer()
loader = PretrainLoader(streamed(), counter, SEQ, BATCH, dp_rank=rank, dp_size=size)
batches = torch.stack([next(loader) for _ in range(STEPS)])
state = loader.state_dict(dist.group.WORLD)  # every lane, on every rank
buffer = io.BytesIO()
torch.save({"chars": counter.chars, "batches": batches, "state": state}, buffer)
open(os.path.join(sys.argv[1], f"rank{rank}.pt"), "wb").write(buffer.getvalue())
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_ranks_each_build_their_share(tmp_path: Path) -> None:
    """4 processes under torchrun: each tokenizes 1/4 of what one process does, their rows
    make the one-process batches, and the gathered state resumes one process exactly."""
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    (port,) = free_ports(1)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(tmp_path / "worker.py"), str(tmp_path),
        ],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]

    counter = CountingTokenizer()
    (single,) = ranks(streamed(), 1, counter)
    reference = torch.stack([next(single) for _ in range(STEPS)])
    after = torch.stack([next(single) for _ in range(5)])
    for result in results:
        assert 0.85 < result["chars"] * 4 / counter.chars < 1.15
    assert torch.equal(torch.cat([r["batches"] for r in results], dim=1), reference)
    (resumed,) = ranks(streamed(), 1)
    resumed.load_state_dict(results[3]["state"])
    assert torch.equal(torch.stack([next(resumed) for _ in range(5)]), after)


# ---------------------------------------------------------------- the background producer


def test_producer_state_is_that_of_the_consumed_batches() -> None:
    cfg = mixture()
    (plain,) = ranks(cfg, 1)
    expected = [next(plain) for _ in range(10)]
    producer = Prefetcher(ranks(cfg, 1)[0], depth=3)
    assert all(torch.equal(next(producer), expected[i]) for i in range(4))
    deadline = time.monotonic() + 60
    while producer.loader.samples_drawn <= BATCH * (4 + 3):  # 3 shuffle slots a lane
        assert time.monotonic() < deadline, "the producer does not run ahead"
        time.sleep(0.01)  # it runs ahead: up to 3 batches queued and a 4th made
    saved = roundtrip(producer.state_dict())
    assert saved["lane_states"][0]["drawn"] == 4 + 3  # 4 consumed, plus the buffer's fill
    (resumed,) = ranks(cfg, 1)
    resumed.load_state_dict(saved)
    assert all(torch.equal(next(resumed), expected[i]) for i in range(4, 10))
    # Loading a state rewinds the producer; closing it forgets what it had prefetched.
    producer.load_state_dict(saved)
    assert torch.equal(next(producer), expected[4])
    producer.close()
    assert all(torch.equal(next(producer), expected[i]) for i in range(5, 10))
    producer.close()


def test_producer_hands_over_loader_errors() -> None:
    class Failing(CountingTokenizer):
        def encode(self, text: str) -> list[int]:
            if self.chars > 5000:
                raise RuntimeError("tokenizer failed")
            return super().encode(text)

    producer = Prefetcher(PretrainLoader(streamed(), Failing(), SEQ, BATCH), depth=2)
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        for _ in range(100):
            next(producer)


def _train_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "-m", "pretrain", "train", "--no-progress", f"run.dir={run_dir}", *SMALL_RUN,
        "train.max_steps=24", "checkpoint.interval=3", *extra,
    ]  # fmt: skip


def _kill_at_random_step(command: list[str], run_dir: Path, env: dict, cwd: Path) -> int:
    """Starts ``command`` and kills its process group with SIGKILL once a random step in
    [4, 12] is logged (of 24: the kill lands well before the end); returns that step."""
    step = random.Random().randint(4, 12)
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and f'"step": {step},' in metrics.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return step


def _run(command: list[str], env: dict, cwd: Path) -> None:
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir / "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["one-process", "torchrun-dp2"])
def test_kill_9_and_resume_with_the_producer_is_bit_exact(tmp_path: Path, nproc: int) -> None:
    """A run without the producer, and one with it killed -9 at a random step and resumed:
    the same loss at every step, bit for bit."""
    env = subprocess_env(SEQBOAT_CACHE_DIR=str(tmp_path / "cache"))
    launcher = [sys.executable]
    if nproc > 1:
        (port,) = free_ports(1)
        launcher += [
            "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
        ]  # fmt: skip
    _run([*launcher, *_train_args(tmp_path / "sync", "data.prefetch=0")], env, tmp_path)
    killed = tmp_path / "killed"
    command = [*launcher, *_train_args(killed, "data.prefetch=3")]
    step = _kill_at_random_step(command, killed, env, tmp_path)
    assert max(_losses(killed)) < 24, f"killed at step {step}, after the last step"
    _run(command, env, tmp_path)
    a, b = _losses(tmp_path / "sync"), _losses(killed)
    assert list(a) == list(range(1, 25))
    assert a == b, f"killed at step {step}"
