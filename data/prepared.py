"""Pre-tokenized corpora: the on-disk format written by ``seqboat prepare data`` and its reader.

A prepared directory holds one source's non-empty documents (the ones ``open_source``
streams, in the same order), each tokenized and followed by EOS. Documents are dealt to
``parts`` in blocks of ``block_documents`` (block ``b`` goes to part ``b % parts``) so that
parts can be written in parallel (local processes, Slurm array tasks) and the result does
not depend on how many workers wrote it. Each part's token stream is cut into shard files of
``shard_tokens`` tokens (the last one shorter):

    manifest.json               format, tokenizer, dtype, sizes, checksums (written last)
    part_00003.idx.npy          int64 [documents + 1]: offsets of the part's documents
    part_00003_00012.bin        16-byte header (magic, checksum prefix) + raw tokens
    part_00003.done.json        the part's manifest entry (the part's commit record)

Shards are read by memory mapping; a document is found from its index alone (the part and
offset follow from the block arithmetic), so a reader touches only the documents it needs.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "seqboat-tokens-1"
MAGIC = b"SQBTOKS1"
HEADER_BYTES = 16  # MAGIC + the first 8 bytes of the payload's sha256
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(part: int, shard: int) -> str:
    return f"part_{part:05d}_{shard:05d}.bin"


def index_name(part: int) -> str:
    return f"part_{part:05d}.idx.npy"


def done_name(part: int) -> str:
    return f"part_{part:05d}.done.json"


def shard_bytes(tokens: np.ndarray) -> tuple[bytes, str]:
    """A shard file's bytes and its payload's sha256."""
    payload = tokens.tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    return MAGIC + bytes.fromhex(digest[:16]) + payload, digest


def document_place(d: int, block: int, parts: int) -> tuple[int, int]:
    """(part, index inside the part) of document ``d``."""
    b = d // block
    return b % parts, (b // parts) * block + d % block


class PreparedDataset:
    """The documents of a prepared directory, read through memory maps."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise ValueError(
                f"{self.directory} is not a prepared token directory (no {MANIFEST}); "
                "write it with `seqboat prepare data`, or finish that run"
            )
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} manifest")
        self.manifest: dict[str, Any] = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.documents: int = manifest["documents"]
        self._block = manifest["block_documents"]
        self._shard_tokens = manifest["shard_tokens"]
        self._parts = manifest["parts"]

    @cached_property
    def _offsets(self) -> list[np.ndarray]:
        offsets = []
        for p, part in enumerate(self._parts):
            path = self.directory / index_name(p)
            if not path.is_file():
                raise ValueError(f"prepared index {path} is missing")
            if hashlib.sha256(path.read_bytes()).hexdigest() != part["index_sha256"]:
                raise ValueError(f"prepared index {path} does not match {MANIFEST}")
            offsets.append(np.load(path))
        return offsets

    @cached_property
    def _shards(self) -> list[list[np.ndarray]]:
        return [
            [self._open_shard(p, s, shard) for s, shard in enumerate(part["shards"])]
            for p, part in enumerate(self._parts)
        ]

    def check(self) -> None:
        """Open every index and shard now (sizes and headers), so that a bad file fails at
        the start of a run, not hours into it."""
        _ = self._offsets, self._shards

    def _open_shard(self, p: int, s: int, shard: dict[str, Any]) -> np.ndarray:
        path = self.directory / shard_name(p, s)
        expected = HEADER_BYTES + shard["tokens"] * self.dtype.itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size < 0:
            raise ValueError(f"prepared shard {path} is missing")
        if size != expected:
            raise ValueError(
                f"prepared shard {path} is truncated or foreign: {size} bytes, "
                f"{MANIFEST} says {expected}"
            )
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if header != MAGIC + bytes.fromhex(shard["sha256"][:16]):
            raise ValueError(
                f"prepared shard {path} is foreign: its header does not match {MANIFEST}"
            )
        return np.memmap(path, dtype=self.dtype, mode="r", offset=HEADER_BYTES)

    def document(self, d: int) -> np.ndarray:
        """The tokens of document ``d`` (without its EOS)."""
        if not 0 <= d < self.documents:
            raise IndexError(f"document {d} of {self.documents}")
        p, i = document_place(d, self._block, len(self._parts))
        offsets = self._offsets[p]
        start, end = int(offsets[i]), int(offsets[i + 1]) - 1
        shards, size = self._shards[p], self._shard_tokens
        pieces = []
        while start < end:
            s, at = divmod(start, size)
            take = min(end - start, size - at)
            pieces.append(shards[s][at : at + take])
            start += take
        return np.concatenate(pieces) if len(pieces) != 1 else np.asarray(pieces[0])

    def check_tokenizer(self, vocab_size: int, eos_id: int, fingerprint: str | None) -> None:
        t = self.manifest["tokenizer"]
        same = t["vocab_size"] == vocab_size and t["eos_id"] == eos_id
        if same and fingerprint is not None and t.get("fingerprint") is not None:
            same = t["fingerprint"] == fingerprint
        if not same:
            raise ValueError(
                f"{self.directory} was prepared with another tokenizer ({t}); this run's has "
                f"vocab_size {vocab_size}, eos_id {eos_id}: prepare it again"
            )
