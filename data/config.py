"""Typed configuration of the data path.

Kept in ``data`` (not ``pretrain``) so that ``data`` never imports ``pretrain``;
``pretrain.config`` composes these dataclasses into the run config.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One document source. Exactly one of ``path``, ``hf_name``, ``builtin`` or
    ``tokenized`` is set.

    - ``path``: local files, a glob or a list of globs; the format comes from the
      extension (.txt/.text -> one document per line, .jsonl/.json -> ``text_field``,
      .parquet -> ``text_field``).
    - ``hf_name``: a Hugging Face dataset streamed from the hub (needs network).
    - ``builtin``: ``"pydoc"``, CPython's reference prose (``pydoc_data.topics``),
      available wherever Python is; one document per topic.
    - ``tokenized``: a directory written by ``seqboat prepare data`` (token shards read by
      memory mapping; the tokenizer must be the one that prepared it).

    ``split_files`` (streamed sources of several files, or hub datasets of several data
    files): give each group of lanes its own block of the files, so that a data-parallel
    rank opens and scans about ``files / DP`` of them instead of all (``data/lanes.py``).
    It changes the source's sample order and holds documents out by their index in their
    file; a single-file source is read the same either way.
    """

    path: str | list[str] | None = None
    hf_name: str | None = None
    hf_subset: str | None = None
    builtin: str | None = None
    tokenized: str | None = None
    split: str = "train"
    text_field: str = "text"
    weight: float = 1.0
    # Local text files that are not valid UTF-8: "strict" stops with an error naming the
    # file, "replace" reads bad bytes as U+FFFD.
    errors: str = "strict"
    split_files: bool = False


@dataclass
class TokenizerConfig:
    """``kind="sentencepiece"`` trains (if ``path`` does not exist) and loads a
    sentencepiece model; ``kind="byte"`` is the lossless UTF-8 byte tokenizer (enwik8)."""

    kind: str = "sentencepiece"
    path: str = "runs/tokenizers/pydoc-bpe-2048.model"
    vocab_size: int = 2048
    model_type: str = "bpe"
    # Bytes of training text read from the train sources (in mixture order) to fit the model.
    train_bytes: int = 50_000_000


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(builtin="pydoc")])
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Every k-th document of each source (k = round(1 / val_fraction)) is held out for validation.
    val_fraction: float = 0.05
    # Packed samples are shuffled through buffers of this many samples in all, spread over the
    # lanes (one per row of the global batch; 0 = no shuffle).
    shuffle_buffer: int = 256
    seed: int = 1234
    # Batches prepared ahead by a background thread while the step runs (0 = in the step).
    prefetch: int = 2
