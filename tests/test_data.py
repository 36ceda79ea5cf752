"""The data path: sources, tokenizers, packing and the resumable, rank-aware loader."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.config import DataConfig, SourceConfig, TokenizerConfig
from data.loader import PretrainLoader, validation_samples
from data.packing import Packer
from data.sources import iter_texts, open_source
from data.tokenizer import ByteTokenizer, build_tokenizer, train_sentencepiece
from tests.conftest import CORPUS

BYTES = ByteTokenizer()


def texts_of(src: SourceConfig) -> list[str]:
    return [example["text"] for example in open_source(src)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def tagged_docs(tag: str, n: int, alphabet: str) -> list[str]:
    """Documents ``<TAGi>`` + filler: unique ids, source recognisable from its alphabet."""
    return [f"<{tag}{i}>" + alphabet * (1 + i % 5) for i in range(n)]


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def token_stream(samples: torch.Tensor) -> list[int]:
    """Undo the overlap-by-one packing of consecutive samples."""
    rows = samples.tolist()
    return rows[0] + [token for row in rows[1:] for token in row[1:]]


def packed(docs: list[str]) -> list[int]:
    return [token for doc in docs for token in [*BYTES.encode(doc), BYTES.eos_id]]


@pytest.fixture
def mixture(tmp_path: Path) -> DataConfig:
    """A large jsonl source and a small text source that wraps around every few samples."""
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"body": d}) + "\n" for d in tagged_docs("A", 300, "ab")))
    small = write_lines(tmp_path / "small.txt", tagged_docs("B", 7, "xyz"))
    return DataConfig(
        sources=[
            SourceConfig(path=str(big), text_field="body", weight=3.0),
            SourceConfig(path=str(small), weight=1.0),
        ],
        val_fraction=0.25,
        shuffle_buffer=8,
        seed=7,
    )


# ---------------------------------------------------------------- sources


def test_text_source_skips_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.txt", ["first", "", "   ", "\t", " second ", "third"])
    assert texts_of(SourceConfig(path=str(path))) == ["first", " second ", "third"]


def test_globs_are_sorted_relative_to_cwd_and_deduplicated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_lines(tmp_path / "d" / "b.txt", ["b1", "b2"])
    write_lines(tmp_path / "d" / "a.txt", ["a1"])
    write_lines(tmp_path / "e" / "c.txt", ["c1"])
    monkeypatch.chdir(tmp_path)
    assert texts_of(SourceConfig(path="d/*.txt")) == ["a1", "b1", "b2"]
    src = SourceConfig(path=["e/*.txt", "d/*.txt", "d/a.txt"])
    assert texts_of(src) == ["c1", "a1", "b1", "b2"]


def test_jsonl_and_parquet_use_text_field(tmp_path: Path) -> None:
    docs = ["one\nwith newline", "", "two", "  "]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"id": range(4), "body": docs}), tmp_path / "a.parquet")
    expected = ["one\nwith newline", "two"]
    assert texts_of(SourceConfig(path=str(jsonl), text_field="body")) == expected
    assert texts_of(SourceConfig(path=str(tmp_path / "*.parquet"), text_field="body")) == expected


def test_hf_name_source_streams_a_dataset_folder(tmp_path: Path) -> None:
    # A local folder goes through the same load_dataset(name, subset, split) call as the hub.
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text('{"text": "hello"}\n{"text": ""}\n')
    assert texts_of(SourceConfig(hf_name=str(tmp_path / "hub"))) == ["hello"]


def test_pydoc_builtin_is_cached_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQBOAT_CACHE_DIR", str(tmp_path))
    texts = texts_of(SourceConfig(builtin="pydoc"))
    assert len(texts) == 79
    assert texts == [topics[key] for key in sorted(topics)]
    (cached,) = tmp_path.glob("pydoc_topics-*.jsonl")
    written = cached.stat().st_mtime_ns
    assert texts_of(SourceConfig(builtin="pydoc")) == texts
    assert cached.stat().st_mtime_ns == written


@pytest.mark.parametrize(
    ("src", "message"),
    [
        (SourceConfig(), "exactly one of"),
        (SourceConfig(path="x.txt", builtin="pydoc"), "exactly one of"),
        (SourceConfig(path="nothing/here/*.txt"), "'nothing/here/\\*.txt' matches no files"),
        (SourceConfig(path=["*.txt", "*.jsonl"]), "mixes file formats"),
        (SourceConfig(path="*.csv"), "unsupported data file extension"),
        (SourceConfig(path="*.jsonl", text_field="content"), "text_field 'content'"),
        (SourceConfig(builtin="wikipedia"), "unknown builtin source 'wikipedia'"),
    ],
)
def test_bad_sources_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src: SourceConfig, message: str
) -> None:
    write_lines(tmp_path / "a.txt", ["a"])
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "a.csv").write_text("text\na\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        open_source(src)


def test_iter_texts_round_robin_until_max_bytes(tmp_path: Path) -> None:
    a = SourceConfig(path=str(write_lines(tmp_path / "a.txt", ["a1", "a2", "a3", "a4"])))
    b = SourceConfig(path=str(write_lines(tmp_path / "b.txt", ["b1"])))
    assert list(iter_texts([a, b], max_bytes=7)) == ["a1", "b1", "a2", "a3"]
    assert list(iter_texts([a, b], max_bytes=1)) == ["a1"]


# ---------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def corpus_sources() -> list[SourceConfig]:
    return [SourceConfig(path=str(path)) for path in sorted(CORPUS.glob("*.txt"))]


@pytest.fixture(scope="module")
def corpus_tokenizer(tmp_path_factory: pytest.TempPathFactory, corpus_sources):
    path = tmp_path_factory.mktemp("tok") / "sub" / "bpe.model"
    return train_sentencepiece(iter_texts(corpus_sources, 2_000_000), path, vocab_size=2000)


def assert_lossless(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert int(tokenizer.token_bytes()[ids].sum()) == len(text.encode())


def test_sentencepiece_is_lossless_on_the_corpus(corpus_tokenizer, corpus_sources) -> None:
    docs = []
    for src in corpus_sources:
        stream = (example["text"] for example in open_source(src))
        # sotu: one speech per line, one of them longer than sentencepiece's sentence limit.
        docs += itertools.islice(stream, 1000)
    assert max(len(doc.encode()) for doc in docs) > 50_000
    for doc in docs:
        assert_lossless(corpus_tokenizer, doc)


@pytest.mark.parametrize(
    "text",
    [
        "a\nb\n\nc\n",
        "  leading and  double\t\ttabs  ",
        "\n\t \n",
        "unicode: naïve café 日本語 🙂 Ω\u2028end",
        "sentencepiece meta \u2581 and \u2581\u2581 literal",
        "<s></s><unk><0x41> control-looking text",
        "crlf\r\nand\x00nul",
    ],
)
def test_sentencepiece_edge_cases_round_trip(corpus_tokenizer, text: str) -> None:
    assert_lossless(corpus_tokenizer, text)


def test_sentencepiece_ids_and_control_bytes(corpus_tokenizer) -> None:
    tok = corpus_tokenizer
    assert (tok.vocab_size, tok.eos_id) == (2000, 2)
    sizes = tok.token_bytes()
    assert sizes.dtype == torch.int64 and sizes.shape == (2000,)
    assert sizes[:3].tolist() == [5, 0, 0]  # unk decodes to " ⁇ "; bos, eos are control
    assert tok.decode([*tok.encode("x"), tok.eos_id, *tok.encode("y")]) == "xy"


def test_sentencepiece_trains_on_lines_longer_than_its_limit(tmp_path: Path) -> None:
    # Only 6 KB lines: sentencepiece would skip every one of them without our splitting.
    words = ["zebra", "quokka", "axolotl", "narwhal"]
    line = " ".join(words[i % 4] for i in range(1000))
    tok = train_sentencepiece([line, line + "\n" + line], tmp_path / "long.model", vocab_size=320)
    assert all(len(tok.encode(" " + word)) == 1 for word in words)
    assert_lossless(tok, line)


def test_byte_tokenizer() -> None:
    text = "héllo\n🙂"
    ids = BYTES.encode(text)
    assert ids == list(text.encode()) and BYTES.decode([*ids, BYTES.eos_id]) == text
    assert_lossless(BYTES, text)
    assert BYTES.token_bytes().tolist() == [1] * 256 + [0]
    assert BYTES.decode([0xF0, 0x9F]) == "\ufffd"


def test_build_tokenizer_trains_once_then_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEQBOAT_CACHE_DIR", str(tmp_path / "cache"))
    sources = [SourceConfig(builtin="pydoc")]
    cfg = TokenizerConfig(path=str(tmp_path / "tok" / "pydoc.model"), vocab_size=600)
    trained = build_tokenizer(cfg, sources)
    assert "training" in capsys.readouterr().err
    loaded = build_tokenizer(cfg, sources)
    assert capsys.readouterr().err == ""
    text = topics["if"]
    assert loaded.encode(text) == trained.encode(text)
    assert isinstance(build_tokenizer(TokenizerConfig(kind="byte"), sources), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size 600 but the config asks for 700"):
        build_tokenizer(TokenizerConfig(path=cfg.path, vocab_size=700), sources)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        build_tokenizer(TokenizerConfig(kind="bpe"), sources)


# ---------------------------------------------------------------- packing


def drain(packer: Packer) -> list[list[int]]:
    samples = []
    while packer.has_sample():
        samples.append(packer.pop())
    return samples


def test_packer_overlaps_by_one_with_eos_between_documents() -> None:
    packer = Packer(seq_length=4, eos_id=99)
    samples = []
    for doc in [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12]]:
        packer.push(doc)
        samples += drain(packer)
    # 16 stream tokens make 3 samples of 5; the 4th would need a 17th token.
    assert samples == [[1, 2, 3, 99, 4], [4, 99, 5, 6, 7], [7, 8, 9, 10, 99]]
    with pytest.raises(RuntimeError):
        packer.pop()


def test_packer_state_round_trip() -> None:
    packer = Packer(seq_length=3, eos_id=0)
    packer.push([1, 2, 3, 4, 5])
    assert packer.pop() == [1, 2, 3, 4]
    restored = Packer(seq_length=3, eos_id=0)
    restored.load_state_dict(roundtrip(packer.state_dict()))
    for p in (packer, restored):
        p.push([6, 7])
        p.push([8, 9, 10])
    assert drain(packer) == drain(restored) == [[4, 5, 0, 6], [6, 7, 0, 8], [8, 9, 10, 0]]


# ---------------------------------------------------------------- loader


def batches(loader: PretrainLoader, n: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(n)]


def doc_ids(rows: torch.Tensor) -> set[str]:
    """Ids of the documents whose ``<id>`` tag lies whole inside one row."""
    return {tag for row in rows for tag in re.findall(r"<([AB]\d+)>", BYTES.decode(row.tolist()))}


def test_train_stream_is_the_train_documents_repeated(tmp_path: Path) -> None:
    docs = tagged_docs("A", 13, "ab")
    path = write_lines(tmp_path / "a.txt", [line for doc in docs for line in (doc, "", " ")])
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], val_fraction=0.25, shuffle_buffer=0)
    train = [doc for d, doc in enumerate(docs) if d % 4 != 3]
    val = [doc for d, doc in enumerate(docs) if d % 4 == 3]

    samples = torch.stack(
        batches(PretrainLoader(cfg, BYTES, seq_length=16, global_batch_size=4), 30)
    )
    assert samples.shape == (30, 4, 17) and samples.dtype == torch.int64
    # Row j of every batch is lane j: train documents g = j, j + 4, ... of the train
    # documents repeated epoch after epoch (same order each epoch).
    repeated = train * 40
    for lane in range(4):
        stream = token_stream(samples[:, lane])
        expected = packed(repeated[lane::4])
        assert len(stream) > 2 * len(packed(train)) // 4
        assert stream == expected[: len(stream)]

    held_out = validation_samples(cfg, BYTES, seq_length=4, num_samples=1000)
    assert len(held_out) == (len(packed(val)) - 1) // 4  # the leftover tail is dropped
    assert token_stream(held_out) == packed(val)[: 4 * len(held_out) + 1]


def test_documents_are_tokenized_lazily(tmp_path: Path) -> None:
    class CountingTokenizer(ByteTokenizer):
        calls = 0

        def encode(self, text: str) -> list[int]:
            self.calls += 1
            return super().encode(text)

    path = write_lines(tmp_path / "a.txt", tagged_docs("A", 1000, "ab"))
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], shuffle_buffer=0)
    tokenizer = CountingTokenizer()
    next(PretrainLoader(cfg, tokenizer, seq_length=16, global_batch_size=2))
    assert tokenizer.calls <= 6  # 33 tokens need at most 5 documents of >= 7 tokens


def test_train_and_validation_documents_are_disjoint(mixture: DataConfig) -> None:
    loader = PretrainLoader(mixture, BYTES, seq_length=32, global_batch_size=8)
    train_ids = doc_ids(torch.cat(batches(loader, 40)))
    val_ids = doc_ids(validation_samples(mixture, BYTES, seq_length=32, num_samples=10_000))
    expected_val = {f"A{d}" for d in range(300) if d % 4 == 3} | {"B3"}
    assert not train_ids & expected_val
    assert val_ids <= expected_val and len(val_ids) > 0.8 * len(expected_val)
    assert len(train_ids) > 150


def test_mixture_follows_the_weights(mixture: DataConfig) -> None:
    rows = torch.cat(batches(PretrainLoader(mixture, BYTES, 16, global_batch_size=100), 20))
    from_a = torch.isin(rows, torch.tensor(BYTES.encode("Aab"))).any(dim=1)
    from_b = torch.isin(rows, torch.tensor(BYTES.encode("Bxyz"))).any(dim=1)
    assert bool((from_a ^ from_b).all())  # every sample comes from exactly one source
    assert 0.72 < from_a.float().mean().item() < 0.78  # weights 3:1 over 2000 samples


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_split_the_global_batch(mixture: DataConfig, dp_size: int) -> None:
    reference = batches(PretrainLoader(mixture, BYTES, 16, global_batch_size=8), 5)
    ranks = [
        PretrainLoader(mixture, BYTES, 16, 8, dp_rank=r, dp_size=dp_size) for r in range(dp_size)
    ]
    for expected in reference:
        parts = [next(rank) for rank in ranks]
        assert all(part.shape == (8 // dp_size, 17) for part in parts)
        assert torch.equal(torch.cat(parts), expected)


def resume_and_compare(cfg: DataConfig, k: int, m: int, dp_size: int = 1) -> tuple[dict, dict]:
    """Save after ``k`` batches; the restored loader(s) must yield the next ``m`` exactly."""
    loader = PretrainLoader(cfg, BYTES, seq_length=16, global_batch_size=8)
    batches(loader, k)
    saved = roundtrip(loader.state_dict())
    expected = batches(loader, m)
    # Restored state must itself be resumable before the loader has produced anything.
    relay = PretrainLoader(cfg, BYTES, seq_length=16, global_batch_size=8)
    relay.load_state_dict(saved)
    relayed = roundtrip(relay.state_dict())
    ranks = [PretrainLoader(cfg, BYTES, 16, 8, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for rank in ranks:
        rank.load_state_dict(relayed)
    for batch in expected:
        assert torch.equal(torch.cat([next(rank) for rank in ranks]), batch)
    return saved, loader.state_dict()


def test_resume_mid_document(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "long.txt", [f"doc{i} " + "lorem ipsum " * 20 for i in range(30)])
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], shuffle_buffer=0)
    saved, _ = resume_and_compare(cfg, k=3, m=4)
    buffers = [lane["sources"][0]["packer"]["buffer"] for lane in saved["lane_states"].values()]
    assert max(len(buffer) for buffer in buffers) > 2  # cut inside a document


@pytest.mark.parametrize("k", [0, 1, 6])
def test_resume_mixture_with_shuffle_across_epochs(mixture: DataConfig, k: int) -> None:
    saved, final = resume_and_compare(mixture, k=k, m=6)
    # The small source (5 train documents) wrapped around between the save and the end.
    epoch = [
        max(lane["sources"][1]["at"]["epoch"] for lane in state["lane_states"].values())
        for state in (saved, final)
    ]
    assert epoch[1] > epoch[0]


def test_resume_on_a_different_number_of_ranks(mixture: DataConfig) -> None:
    resume_and_compare(mixture, k=4, m=3, dp_size=2)


def test_validation_samples_split_over_ranks(mixture: DataConfig) -> None:
    every = validation_samples(mixture, BYTES, seq_length=16, num_samples=10)
    assert every.shape == (10, 17)
    parts = [validation_samples(mixture, BYTES, 16, 10, dp_rank=r, dp_size=3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 4]
    assert torch.equal(torch.cat(parts), every)  # the same set whatever the number of ranks


def test_loader_rejects_bad_settings(tmp_path: Path, mixture: DataConfig) -> None:
    with pytest.raises(ValueError, match="multiple of dp_size"):
        PretrainLoader(mixture, BYTES, 16, global_batch_size=6, dp_size=4)
    with pytest.raises(ValueError, match="val_fraction"):
        PretrainLoader(DataConfig(sources=mixture.sources, val_fraction=0.5), BYTES, 16, 8)
    with pytest.raises(ValueError, match="no validation documents"):
        validation_samples(DataConfig(sources=mixture.sources, val_fraction=0), BYTES, 16, 8)
    empty = write_lines(tmp_path / "empty.txt", ["", "  "])
    with pytest.raises(ValueError, match=r"empty\.txt.* has no training documents"):
        PretrainLoader(DataConfig(sources=[SourceConfig(path=str(empty))]), BYTES, 16, 8)
    state = PretrainLoader(mixture, BYTES, 16, 8).state_dict()
    with pytest.raises(ValueError, match="seq_length 16"):
        PretrainLoader(mixture, BYTES, 32, 8).load_state_dict(state)


# ---------------------------------------------------------------- bad input: one error line


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs ``seqboat ARGV`` in-process; the one ``seqboat: error:`` line it ends with."""
    from pretrain.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("seqboat: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"path='.*empty\.txt' has no documents"),
        (b"\n  \n\t\n", r"path='.*empty\.txt' has no documents"),
        # Every line past sentencepiece's sentence limit, and too little text for the vocab.
        (b"x" * 9000 + b"\n" + b"y" * 5000 + b"\n", r"on path='.*empty\.txt': Vocabulary size"),
        (
            b"fine\nnot \xff\xfe utf-8\n",
            r"empty\.txt \(byte 9\) is not valid UTF-8.*errors: replace",
        ),
    ],
    ids=["empty", "blank", "long-lines", "not-utf8"],
)
def test_bad_source_for_the_tokenizer_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    (tmp_path / "empty.txt").write_bytes(content)
    line = cli_error(
        capsys, "prepare", "tokenizer", f"data.sources=[{{path: '{tmp_path}/empty.txt'}}]",
        f"data.tokenizer.path={tmp_path / 'tok.model'}", "data.tokenizer.vocab_size=300",
    )  # fmt: skip
    assert re.search(message, line), line
    assert not (tmp_path / "tok.model").exists()


def test_errors_replace_reads_a_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\nnaïve\n".encode("latin-1"))
    src = SourceConfig(path=str(path), errors="replace")
    assert texts_of(src) == ["caf\ufffd", "na\ufffdve"]
    with pytest.raises(ValueError, match=r"latin1\.txt \(byte 3\) is not valid UTF-8"):
        PretrainLoader(DataConfig(sources=[SourceConfig(path=str(path))]), BYTES, 4, 2).__next__()


def test_empty_source_when_training_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    line = cli_error(
        capsys, "train", "--no-progress", "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}",
        f"data.sources=[{{path: '{tmp_path}/empty.txt'}}]", "data.tokenizer.kind=byte",
    )  # fmt: skip
    assert re.search(r"path='.*empty\.txt' has no training documents", line), line


def test_unreachable_hub_says_the_network_failed(tmp_path: Path) -> None:
    """As a new user without network would: offline, the hub cannot be asked."""
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable, "-m", "pretrain", "prepare", "tokenizer",
            "data.sources=[{hf_name: HuggingFaceFW/fineweb-edu}]",
            f"data.tokenizer.path={tmp_path / 'tok.model'}",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("seqboat: error: data source hf_name='HuggingFaceFW/fineweb-edu'")
    assert "cannot be reached (the network failed, not the name" in line
    assert "Traceback" not in out.stderr


def test_unknown_hub_name_says_the_name_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def not_found(name: str, *args, **kwargs):
        raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(
        ValueError, match=r"hf_name='nobody/nothing': no such dataset .*name failed"
    ):
        open_source(SourceConfig(hf_name="nobody/nothing"))
