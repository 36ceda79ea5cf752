"""Document sources: local files, Hugging Face hub datasets and built-in corpora.

Every source is a streamed ``datasets.IterableDataset`` of ``{"text": str}`` examples with
empty and whitespace-only documents removed, so that downstream document counting (the
train/validation split) is the same whatever the format.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import uuid
from collections.abc import Iterator
from pathlib import Path

import datasets

from data.config import SourceConfig

_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def describe(src: SourceConfig) -> str:
    """A short human-readable name of a source, for error messages and logs."""
    if src.path is not None:
        return f"path={src.path!r}"
    if src.hf_name is not None:
        return f"hf_name={src.hf_name!r}"
    return f"builtin={src.builtin!r}"


def open_source(src: SourceConfig) -> datasets.IterableDataset:
    """Stream the non-empty documents of ``src`` as ``{"text": ...}`` examples."""
    given = [
        name
        for name, value in (("path", src.path), ("hf_name", src.hf_name), ("builtin", src.builtin))
        if value
    ]
    if len(given) != 1:
        raise ValueError(
            f"a data source needs exactly one of path, hf_name or builtin; got {given or 'none'}"
        )
    if src.path:
        patterns = [src.path] if isinstance(src.path, str) else list(src.path)
        dataset = _open_files(_expand(patterns), src.text_field)
    elif src.hf_name:
        dataset = datasets.load_dataset(src.hf_name, src.hf_subset, split=src.split, streaming=True)
        dataset = _text_column(dataset, src.text_field, describe(src))
    else:
        dataset = _open_files([str(_builtin_file(src.builtin))], "text")
    return dataset.filter(_is_document, input_columns="text")


def iter_texts(sources: list[SourceConfig], max_bytes: int) -> Iterator[str]:
    """The first documents of each source, round robin, until ``max_bytes`` UTF-8 bytes.

    The document that crosses ``max_bytes`` is yielded whole; exhausted sources drop out.
    """
    streams = [iter(open_source(src)) for src in sources]
    total = 0
    while streams:
        for stream in list(streams):
            example = next(stream, None)
            if example is None:
                streams.remove(stream)
                continue
            yield example["text"]
            total += len(example["text"].encode())
            if total >= max_bytes:
                return


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers (other ranks) never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer; plain open() (unlike mkstemp's 0600) keeps the umask's permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_document(text: str | None) -> bool:
    return bool(text) and not text.isspace()


def _expand(patterns: list[str]) -> list[str]:
    files: dict[str, None] = {}  # ordered set: overlapping globs must not read a file twice
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise ValueError(f"data source pattern {pattern!r} matches no files")
        files.update(dict.fromkeys(matches))
    return list(files)


def _open_files(files: list[str], text_field: str) -> datasets.IterableDataset:
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    unknown = [s for s in suffixes if s not in _BUILDERS]
    if unknown:
        raise ValueError(f"unsupported data file extension(s) {unknown}; use one of {[*_BUILDERS]}")
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) != 1:
        raise ValueError(f"a data source mixes file formats {suffixes}; use one source per format")
    (builder,) = builders
    # Local files need no network; without this, datasets pings the hub's download counter
    # on every load (a 3 s timeout per call on a firewalled cluster node).
    counting, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = (
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS,
        False,
    )
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counting
    if builder == "text":  # one document per line, always in the "text" column
        return dataset
    return _text_column(dataset, text_field, f"files {files[:3]}")


def _text_column(
    dataset: datasets.IterableDataset, field: str, name: str
) -> datasets.IterableDataset:
    columns = dataset.column_names
    if columns is not None and field not in columns:
        raise ValueError(f"text_field {field!r} is not a column of {name}; columns: {columns}")
    dataset = dataset.select_columns([field])
    return dataset if field == "text" else dataset.rename_column(field, "text")


def _cache_dir() -> Path:
    return Path(os.environ.get("SEQBOAT_CACHE_DIR", "~/.cache/seqboat")).expanduser()


def _builtin_file(name: str) -> Path:
    if name != "pydoc":
        raise ValueError(f"unknown builtin source {name!r}; available: 'pydoc'")
    # The topics change between Python releases: key the cache by version.
    path = _cache_dir() / f"pydoc_topics-{platform.python_version()}.jsonl"
    if not path.exists():
        from pydoc_data.topics import topics

        lines = (json.dumps({"text": topics[key]}) + "\n" for key in sorted(topics))
        write_atomic(path, "".join(lines).encode())
    return path
