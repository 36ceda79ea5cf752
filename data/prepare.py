"""``seqboat prepare data``: a source's documents -> token shards (see ``data/prepared.py``).

Work is split into ``parts`` (a fixed number, independent of the workers): local worker
processes and Slurm array tasks (``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``) each
take their share of the parts. A part is committed by its ``done`` record, written after its
shards and index (each file written to a temporary name and renamed); a re-run skips the
committed parts, and inside an unfinished part leaves the shards that are already correct
on disk. Whoever finds every part committed writes the manifest; it holds no time stamps,
so a killed and re-run preparation ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from data.config import DataConfig, SourceConfig, TokenizerConfig
from data.prepared import (
    FORMAT,
    HEADER_BYTES,
    MANIFEST,
    done_name,
    index_name,
    shard_bytes,
    shard_name,
    token_dtype,
)
from data.sources import describe, documents, open_source, write_atomic
from data.tokenizer import build_tokenizer


@dataclass(frozen=True)
class PrepareOptions:
    shard_tokens: int = 1 << 26  # 64 Mi tokens: 128 MiB shards with uint16
    block_documents: int = 1000
    parts: int = 16


def array_task() -> tuple[int, int]:
    """(this task's index, number of tasks) of a Slurm job array; (0, 1) outside one."""
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", str(first))) - first
    if not 0 <= task < count:
        raise ValueError(f"SLURM_ARRAY_TASK_ID {task + first} is outside the array of {count}")
    return task, count


def prepare_source(
    src: SourceConfig,
    tokenizer_cfg: TokenizerConfig,
    out: str | Path,
    options: PrepareOptions,
    workers: int = 1,
    task: tuple[int, int] = (0, 1),
) -> bool:
    """Writes this task's parts of ``src`` into ``out``; then the manifest if every part is
    done. Returns whether the manifest exists."""
    for name, value in (("shard_tokens", options.shard_tokens), ("parts", options.parts)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if options.block_documents < 1:
        raise ValueError(f"block_documents must be positive, got {options.block_documents}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index, count = task
    mine = [p for p in range(options.parts) if p % count == index]
    todo = [p for p in mine if _committed(out, p, options) is None]
    if todo:
        args = [(src, tokenizer_cfg, str(out), options, p) for p in todo]
        if workers > 1 and len(todo) > 1:
            # spawn: no fork of a process that may hold threads (datasets, torch).
            with ProcessPoolExecutor(
                min(workers, len(todo)), mp_context=get_context("spawn")
            ) as pool:
                list(pool.map(_write_part_args, args))
        else:
            for a in args:
                _write_part_args(a)
    return write_manifest(src, tokenizer_cfg, out, options)


def _write_part_args(args: tuple) -> None:
    write_part(*args)


def _committed(out: Path, part: int, options: PrepareOptions) -> dict[str, Any] | None:
    path = out / done_name(part)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("options") != _options_record(options):
        raise ValueError(
            f"{out} was prepared with other options ({record.get('options')}); "
            "use another directory or the same options"
        )
    return record


def _options_record(options: PrepareOptions) -> dict[str, int]:
    return {
        "shard_tokens": options.shard_tokens,
        "block_documents": options.block_documents,
        "parts": options.parts,
    }


def write_part(
    src: SourceConfig, tokenizer_cfg: TokenizerConfig, out: str, options: PrepareOptions, part: int
) -> None:
    """Tokenizes the documents of ``part`` and commits it."""
    out_dir = Path(out)
    tokenizer = build_tokenizer(tokenizer_cfg, [src])
    dtype = token_dtype(tokenizer.vocab_size)
    block, parts, size = options.block_documents, options.parts, options.shard_tokens
    offsets = [0]
    pending: list[np.ndarray] = []
    pending_tokens = 0
    shards: list[dict[str, Any]] = []

    def flush(final: bool) -> None:
        nonlocal pending, pending_tokens
        stream = np.concatenate(pending) if pending else np.empty(0, dtype)
        while len(stream) >= size or (final and len(stream)):
            shards.append(_write_shard(out_dir, part, len(shards), stream[:size]))
            stream = stream[size:]
        pending, pending_tokens = [stream], len(stream)

    for d, example in enumerate(documents(src, open_source(src))):
        if (d // block) % parts != part:
            continue
        tokens = np.asarray([*tokenizer.encode(example["text"]), tokenizer.eos_id], dtype=dtype)
        pending.append(tokens)
        pending_tokens += len(tokens)
        offsets.append(offsets[-1] + len(tokens))
        if pending_tokens >= size:
            flush(final=False)
    flush(final=True)
    index = _npy_bytes(np.asarray(offsets, dtype=np.int64))
    write_atomic(out_dir / index_name(part), index)
    record = {
        "options": _options_record(options),
        "documents": len(offsets) - 1,
        "tokens": offsets[-1],
        "index_sha256": hashlib.sha256(index).hexdigest(),
        "shards": shards,
    }
    write_atomic(out_dir / done_name(part), _json_bytes(record))


def _write_shard(out: Path, part: int, shard: int, tokens: np.ndarray) -> dict[str, Any]:
    data, digest = shard_bytes(tokens)
    path = out / shard_name(part, shard)
    # Finished by an earlier, killed run: leave it (same bytes, same checksum).
    if not (
        path.is_file() and path.stat().st_size == len(data) and _header(path) == data[:HEADER_BYTES]
    ):
        write_atomic(path, data)
    return {"tokens": len(tokens), "sha256": digest}


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_BYTES)


def write_manifest(
    src: SourceConfig, tokenizer_cfg: TokenizerConfig, out: Path, options: PrepareOptions
) -> bool:
    """The manifest, once every part is committed (idempotent: same bytes each time)."""
    records = [_committed(out, p, options) for p in range(options.parts)]
    if any(r is None for r in records):
        done = sum(r is not None for r in records)
        print(
            f"seqboat: {out}: {done}/{options.parts} parts done; the manifest is written when "
            "all are (re-run the same command, or let the last array task finish)",
            file=sys.stderr,
        )
        return False
    tokenizer = build_tokenizer(tokenizer_cfg, [src])
    parts = [{k: v for k, v in r.items() if k != "options"} for r in records]
    manifest = {
        "format": FORMAT,
        "source": describe(src),
        "tokenizer": {
            "kind": tokenizer_cfg.kind,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "fingerprint": getattr(tokenizer, "fingerprint", None),
        },
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "shard_tokens": options.shard_tokens,
        "block_documents": options.block_documents,
        "documents": sum(p["documents"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "parts": parts,
    }
    payload = _json_bytes(manifest)
    path = out / MANIFEST
    if not (path.is_file() and path.read_bytes() == payload):
        write_atomic(path, payload)
    return True


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def prepare_sources(
    cfg: DataConfig, out: str | Path, options: PrepareOptions, workers: int = 1
) -> bool:
    """``seqboat prepare data``: every text source of ``cfg`` into ``out`` (``out/source_<i>``
    when there are several). Returns whether every manifest is written."""
    texts = [(i, src) for i, src in enumerate(cfg.sources) if not src.tokenized]
    if not texts:
        raise ValueError("data.sources has no text source to prepare (all are tokenized:)")
    if workers < 1:
        raise ValueError(f"--workers must be positive, got {workers}")
    task = array_task()
    if task[1] > 1 and cfg.tokenizer.kind != "byte" and not Path(cfg.tokenizer.path).exists():
        raise ValueError(
            f"tokenizer {cfg.tokenizer.path} does not exist: run `seqboat prepare tokenizer` "
            "once before the array job (its tasks would each train one)"
        )
    # Train a missing tokenizer once, here, not in every worker.
    build_tokenizer(cfg.tokenizer, cfg.sources)
    complete = True
    for i, src in texts:
        target = Path(out) if len(texts) == 1 else Path(out) / f"source_{i}"
        done = prepare_source(src, cfg.tokenizer, target, options, workers, task)
        complete &= done
        if done:
            manifest = json.loads((target / MANIFEST).read_text())
            print(
                f"{describe(src)}: {manifest['documents']:,} documents, "
                f"{manifest['tokens']:,} tokens -> {target}  "
                f"(use as data.sources: [{{tokenized: {str(target)!r}, weight: {src.weight}}}])"
            )
    return complete


ENWIK8_BYTES = 100_000_000


def split_enwik8(source: str | Path, out: str | Path, total: int = ENWIK8_BYTES) -> list[Path]:
    """The standard enwik8 (``enwik8.zip`` from the Hutter prize page, or the file itself)
    split as in the paper: the first 90% of its bytes for training, then 5% validation and
    5% test (90M/5M/5M), as ``train.txt``, ``valid.txt``, ``test.txt``."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
            if "enwik8" not in names:
                raise ValueError(f"{source} has no member 'enwik8' (it has {names[:5]})")
            data = archive.read("enwik8")
    else:
        data = source.read_bytes()
    if len(data) != total:
        raise ValueError(f"{source} holds {len(data):,} bytes; the standard enwik8 has {total:,}")
    train, valid = total * 90 // 100, total * 95 // 100
    paths = []
    for name, part in (
        ("train", data[:train]),
        ("valid", data[train:valid]),
        ("test", data[valid:]),
    ):
        path = Path(out) / f"{name}.txt"
        write_atomic(path, part)
        paths.append(path)
    return paths
