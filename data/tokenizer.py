"""Tokenizers: lossless sentencepiece (trained on the run's own sources) and UTF-8 bytes."""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm
import torch

from data.config import SourceConfig, TokenizerConfig
from data.sources import describe, iter_texts, write_atomic

# sentencepiece silently drops training sentences longer than this many bytes.
_MAX_SENTENCE_BYTES = 4192
# sentencepiece's whitespace marker; it decodes to " ", so a literal one is sent as bytes.
_META = "\u2581"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: UTF-8 bytes each id adds to the decoded text (0 for control ids)."""
        ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text, 256 is end of document."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "bytes"  # names the tokenizer in prepared data's manifests

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode(errors="replace")

    def token_bytes(self) -> torch.Tensor:
        sizes = torch.ones(self.vocab_size, dtype=torch.int64)
        sizes[self.eos_id] = 0
        return sizes


class SentencePieceTokenizer:
    """A model written by :func:`train_sentencepiece` (identity normalization, byte fallback)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        # Names the tokenizer in prepared data's manifests.
        self.fingerprint = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.vocab_size: int = self._sp.get_piece_size()
        self.eos_id: int = self._sp.eos_id()
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]
        if not all(self._sp.is_byte(i) for i in self._meta_ids):
            raise ValueError(f"{path} was trained without byte_fallback; it cannot be lossless")
        self._token_bytes = torch.tensor(
            [
                1 if self._sp.is_byte(i) else len(self._sp.decode([i]).encode())
                for i in range(self.vocab_size)
            ],
            dtype=torch.int64,
        )

    def encode(self, text: str) -> list[int]:
        if _META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_META)):
            if i:
                ids.extend(self._meta_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def token_bytes(self) -> torch.Tensor:
        return self._token_bytes


def train_sentencepiece(
    texts: Iterable[str],
    path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    sources: str = "",
) -> SentencePieceTokenizer:
    """Train a lossless sentencepiece model on ``texts`` and write it atomically to ``path``
    (``sources`` names where the texts come from, for error messages)."""
    model = io.BytesIO()
    try:
        _train(texts, model, vocab_size, model_type)
    except RuntimeError as error:  # sentencepiece's C++ check failures
        # "INTERNAL: src/x.cc(744) [check] message": keep the message.
        message = re.sub(r"^\w+: \S+\(\d+\) \[.*?\]\s*", "", str(error)).strip()
        raise ValueError(
            f"sentencepiece could not train a {vocab_size}-token {model_type} model on "
            f"{sources or 'the given texts'}: {message or 'no training sentences'}"
        ) from error
    write_atomic(path, model.getvalue())
    return SentencePieceTokenizer(path)


def _train(texts: Iterable[str], model: io.BytesIO, vocab_size: int, model_type: str) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        # Lossless: no normalization, whitespace kept verbatim, unseen characters as bytes.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        character_coverage=1.0,
        # Training sees lines, so "\n" would otherwise only be reachable through byte fallback.
        user_defined_symbols=["\n"],
        # Runs of spaces (code indentation) may become single pieces.
        allow_whitespace_only_pieces=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        minloglevel=2,
    )


def build_tokenizer(cfg: TokenizerConfig, sources: list[SourceConfig]) -> Tokenizer:
    """The tokenizer ``cfg`` names; a missing sentencepiece model is trained from ``sources``."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind != "sentencepiece":
        raise ValueError(f"unknown tokenizer kind {cfg.kind!r}; use 'sentencepiece' or 'byte'")
    if not Path(cfg.path).exists():
        print(
            f"training {cfg.model_type} sentencepiece tokenizer (vocab {cfg.vocab_size}) "
            f"on up to {cfg.train_bytes:,} bytes of the sources -> {cfg.path}",
            file=sys.stderr,
            flush=True,
        )
        texts = iter_texts(sources, cfg.train_bytes)
        names = ", ".join(describe(src) for src in sources if src.tokenized is None)
        return train_sentencepiece(texts, cfg.path, cfg.vocab_size, cfg.model_type, names)
    tokenizer = SentencePieceTokenizer(cfg.path)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"tokenizer {cfg.path} has vocab_size {tokenizer.vocab_size} but the config asks for "
            f"{cfg.vocab_size}; change tokenizer.path or delete the file to retrain"
        )
    return tokenizer


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Lines of ``texts``, long ones cut at whitespace so that sentencepiece keeps them."""
    for text in texts:
        for line in text.split("\n"):
            if len(line.encode()) <= _MAX_SENTENCE_BYTES:
                if line:
                    yield line
            else:
                yield from _split_long_line(line)


def _split_long_line(line: str) -> Iterator[str]:
    chunk, size = "", 0
    for word in re.split(r"(?<=\s)(?=\S)", line):  # words with their trailing whitespace
        n = len(word.encode())
        if size + n > _MAX_SENTENCE_BYTES and chunk:
            yield chunk
            chunk, size = "", 0
        if n > _MAX_SENTENCE_BYTES:
            # No whitespace to cut at: cut by characters, at most 4 UTF-8 bytes each.
            step = _MAX_SENTENCE_BYTES // 4
            yield from (word[i : i + step] for i in range(0, len(word), step))
            continue
        chunk += word
        size += n
    if chunk:
        yield chunk
