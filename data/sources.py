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
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError

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
    if src.tokenized is not None:
        return f"tokenized={src.tokenized!r}"
    return f"builtin={src.builtin!r}"


def open_source(src: SourceConfig) -> datasets.IterableDataset:
    """Stream the non-empty documents of ``src`` as ``{"text": ...}`` examples."""
    given = [
        name
        for name, value in (
            ("path", src.path),
            ("hf_name", src.hf_name),
            ("builtin", src.builtin),
            ("tokenized", src.tokenized),
        )
        if value
    ]
    if len(given) != 1:
        raise ValueError(
            "a data source needs exactly one of path, hf_name, builtin or tokenized; "
            f"got {given or 'none'}"
        )
    if src.tokenized:
        raise ValueError(f"data source {describe(src)} holds tokens, not text")
    if src.errors not in ("strict", "replace"):
        raise ValueError(f"data source {describe(src)}: errors must be 'strict' or 'replace'")
    if src.path:
        dataset = _open_files(_source_files(src), src.text_field, src.errors)
    elif src.hf_name:
        dataset = _load_hub(src)
        dataset = _text_column(dataset, src.text_field, describe(src))
    else:
        dataset = _open_files([str(_builtin_file(src.builtin))], "text")
    return dataset.filter(_is_document, input_columns="text")


def units(src: SourceConfig, dataset: datasets.IterableDataset) -> list[datasets.IterableDataset]:
    """What a streamed source (``open_source(src)``) is read in: one dataset per file (per
    ``datasets`` shard: a local file, a hub data file) when ``src.split_files`` and it has
    several, else the whole source. Documents are held out by their index in their unit."""
    n = dataset.n_shards
    if not src.split_files or n < 2:
        return [dataset]
    return [dataset.shard(num_shards=n, index=i, contiguous=True) for i in range(n)]


def describe_files(src: SourceConfig, files: range, count: int) -> str:
    """Files ``files`` of the ``count`` units of ``src`` split by file, for messages."""
    names = _source_files(src) if src.path else []
    if len(names) != count:  # a hub dataset: its data files by number
        return f"files {files.start}-{files.stop - 1} of {count}"
    shown = [names[i] for i in files[:3]]
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return f"{', '.join(shown)}{more}"


def documents(src: SourceConfig, dataset: datasets.IterableDataset) -> Iterator[dict[str, Any]]:
    """Iterates ``dataset`` (``open_source(src)``); a file that is not valid UTF-8 is one
    error naming it, not a decoder traceback."""
    try:
        yield from dataset
    except UnicodeDecodeError as error:
        raise _decode_error(src, error) from error


def _source_files(src: SourceConfig) -> list[str]:
    patterns = [src.path] if isinstance(src.path, str) else list(src.path or [])
    return _expand(patterns)


def _decode_error(src: SourceConfig, error: UnicodeDecodeError) -> ValueError:
    where = "one of its files"
    if src.path:  # error path only: find the file (the decoder does not say which)
        for name in _source_files(src):
            try:
                Path(name).read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{name} (byte {e.start})"
                break
    return ValueError(
        f"data source {describe(src)}: {where} is not valid UTF-8; set `errors: replace` "
        "on the source to read bad bytes as U+FFFD"
    )


def _load_hub(src: SourceConfig) -> datasets.IterableDataset:
    """A hub dataset, streamed; says whether the name or the network failed."""
    try:
        return datasets.load_dataset(src.hf_name, src.hf_subset, split=src.split, streaming=True)
    except DatasetNotFoundError as e:
        raise ValueError(
            f"data source {describe(src)}: no such dataset on the Hugging Face hub (the hub "
            f"answered: the name failed, not the network): {_first_line(e)}"
        ) from e
    except (ConnectionError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise ValueError(f"data source {describe(src)}: {_first_line(e)}") from e
        offline = (
            "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)"
            if (datasets.config.HF_HUB_OFFLINE)
            else "is the network down or firewalled?"
        )
        raise ValueError(
            f"data source {describe(src)}: the Hugging Face hub cannot be reached (the "
            f"network failed, not the name; {offline}): {_first_line(e)}"
        ) from e


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def iter_texts(sources: list[SourceConfig], max_bytes: int) -> Iterator[str]:
    """The first documents of each source, round robin, until ``max_bytes`` UTF-8 bytes.

    The document that crosses ``max_bytes`` is yielded whole; exhausted sources drop out.
    """
    # Prepared sources hold tokens, not text: a tokenizer trains on the text sources.
    text_sources = [src for src in sources if src.tokenized is None]
    streams = {i: documents(src, open_source(src)) for i, src in enumerate(text_sources)}
    seen = dict.fromkeys(streams, 0)
    total = 0
    while streams:
        for i, stream in list(streams.items()):
            example = next(stream, None)
            if example is None:
                if not seen[i]:
                    raise ValueError(
                        f"data source {describe(text_sources[i])} has no documents (it is "
                        "empty or all whitespace)"
                    )
                del streams[i]
                continue
            seen[i] += 1
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


def _open_files(
    files: list[str], text_field: str, errors: str = "strict"
) -> datasets.IterableDataset:
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
        # Parquet stores typed strings: no decoding to configure.
        decoding = {} if builder == "parquet" else {"encoding_errors": errors}
        dataset = datasets.load_dataset(
            builder, data_files=files, split="train", streaming=True, **decoding
        )
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
