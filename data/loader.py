"""Deterministic, resumable, rank-aware batches from a weighted mixture of sources.

Every rank computes the same *global* sample stream and keeps its rows of each global batch,
so the data order does not depend on the data-parallel size and a run can resume on a
different number of ranks. All randomness is counter based (``numpy`` generators seeded
with ``[seed, stream, index]``): the state to resume is counters and buffers, no RNG state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.config import DataConfig, SourceConfig
from data.packing import Packer
from data.sources import describe, open_source
from data.tokenizer import Tokenizer

# Independent counter-based random streams.
_MIXTURE, _SHUFFLE = 0, 1


def _holdout_every(val_fraction: float) -> int:
    """``k`` such that document ``d`` of each source is held out iff ``d % k == k - 1``
    (0: nothing is held out)."""
    if not 0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    return round(1 / val_fraction) if val_fraction else 0


class _SourceStream:
    """One source's documents on one side of the train/validation split, tokenized lazily
    and packed. The train side repeats forever (same order each epoch); validation is one pass.
    """

    def __init__(
        self,
        src: SourceConfig,
        tokenizer: Tokenizer,
        seq_length: int,
        holdout: int,
        validation: bool,
    ) -> None:
        self._src = src
        self._tokenizer = tokenizer
        self._holdout = holdout
        self._validation = validation
        self.packer = Packer(seq_length, tokenizer.eos_id)
        self._epoch = 0
        self._doc_index = 0  # non-empty documents read this epoch, both sides of the split
        # One dataset for all epochs: reopening costs a `load_dataset` call each time, and
        # `set_epoch` would reshuffle the shards. Loading the pre-iteration state rewinds it.
        self._dataset = open_source(src)
        self._start = self._dataset.state_dict()
        self._restart(self._start)

    def _restart(self, dataset_state: dict) -> None:
        self._dataset.load_state_dict(dataset_state)
        self._documents = iter(self._dataset)
        # `IterableDataset.state_dict()` reflects a loaded state only once iteration has
        # started, so keep our own copy, refreshed after every example we take.
        self._dataset_state = dataset_state

    def next_sample(self) -> list[int] | None:
        """The next packed sample, or None when a validation stream runs out."""
        while not self.packer.has_sample():
            text = self._next_document()
            if text is None:
                return None
            self.packer.push(self._tokenizer.encode(text))
        return self.packer.pop()

    def _next_document(self) -> str | None:
        while True:
            example = next(self._documents, None)
            if example is None:
                if self._validation:
                    return None
                # k >= 2, so document 0 is always a train document: no documents, no training.
                if self._doc_index == 0:
                    raise ValueError(f"data source {describe(self._src)} has no training documents")
                self._epoch += 1
                self._doc_index = 0
                self._restart(self._start)
                continue
            self._dataset_state = self._dataset.state_dict()
            held_out = self._holdout > 0 and self._doc_index % self._holdout == self._holdout - 1
            self._doc_index += 1
            if held_out == self._validation:
                return example["text"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "dataset": self._dataset_state,
            "epoch": self._epoch,
            "doc_index": self._doc_index,
            "packer": self.packer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = state["epoch"]
        self._doc_index = state["doc_index"]
        self.packer.load_state_dict(state["packer"])
        self._restart(state["dataset"])


class PretrainLoader:
    """Infinite iterator of this rank's rows of each global batch:
    LongTensor ``[global_batch_size // dp_size, seq_length + 1]``."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        seq_length: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"dp_size {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        if not cfg.sources:
            raise ValueError("data.sources is empty")
        weights = np.array([src.weight for src in cfg.sources], dtype=np.float64)
        if not (weights > 0).all():
            raise ValueError(f"source weights must be positive, got {weights.tolist()}")
        if cfg.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {cfg.shuffle_buffer}")
        holdout = _holdout_every(cfg.val_fraction)
        self._cfg = cfg
        self._seq_length = seq_length
        self._global_batch_size = global_batch_size
        self._rows = slice(
            dp_rank * global_batch_size // dp_size, (dp_rank + 1) * global_batch_size // dp_size
        )
        self._cumulative = np.cumsum(weights / weights.sum())
        self._cumulative[-1] = 1.0  # so that every u in [0, 1) falls in some source
        self._streams = [
            _SourceStream(src, tokenizer, seq_length, holdout, validation=False)
            for src in cfg.sources
        ]
        self._drawn = 0  # samples taken from the mixture
        self._emitted = 0  # samples taken out of the shuffle buffer
        self._shuffle: list[torch.Tensor] = []

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> torch.Tensor:
        batch = [self._next_sample() for _ in range(self._global_batch_size)]
        return torch.stack(batch[self._rows])

    def _draw(self) -> torch.Tensor:
        """The next sample of the (unshuffled) mixture."""
        source = 0
        if len(self._streams) > 1:
            u = np.random.default_rng([self._cfg.seed, _MIXTURE, self._drawn]).random()
            source = int(np.searchsorted(self._cumulative, u, side="right"))
        self._drawn += 1
        return torch.tensor(self._streams[source].next_sample(), dtype=torch.int64)

    def _next_sample(self) -> torch.Tensor:
        size = self._cfg.shuffle_buffer
        if size == 0:
            return self._draw()
        while len(self._shuffle) < size:
            self._shuffle.append(self._draw())
        rng = np.random.default_rng([self._cfg.seed, _SHUFFLE, self._emitted])
        slot = int(rng.integers(size))
        self._emitted += 1
        sample, self._shuffle[slot] = self._shuffle[slot], self._draw()
        return sample

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; identical on every data-parallel rank."""
        return {
            "seq_length": self._seq_length,
            "drawn": self._drawn,
            "emitted": self._emitted,
            "shuffle_buffer": (
                torch.stack(self._shuffle)
                if self._shuffle
                else torch.empty(0, self._seq_length + 1, dtype=torch.int64)
            ),
            "sources": [stream.state_dict() for stream in self._streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seq_length"] != self._seq_length:
            raise ValueError(
                f"data state was saved with seq_length {state['seq_length']}, "
                f"this run uses {self._seq_length}"
            )
        if len(state["sources"]) != len(self._streams):
            raise ValueError(
                f"data state has {len(state['sources'])} sources, the config has "
                f"{len(self._streams)}"
            )
        buffered = len(state["shuffle_buffer"])
        if buffered not in (0, self._cfg.shuffle_buffer):
            raise ValueError(
                f"data state has a shuffle buffer of {buffered} samples, the config asks for "
                f"{self._cfg.shuffle_buffer}"
            )
        self._drawn = state["drawn"]
        self._emitted = state["emitted"]
        self._shuffle = list(state["shuffle_buffer"].clone().unbind(0))
        for stream, stream_state in zip(self._streams, state["sources"], strict=True):
            stream.load_state_dict(stream_state)


def validation_samples(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    seq_length: int,
    num_samples: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> torch.Tensor:
    """The first ``num_samples`` samples of the held-out documents (sources round robin,
    sample by sample, no shuffle); returns this rank's contiguous share, LongTensor
    ``[~n / dp_size, seq_length + 1]``. Shares differ by at most one sample, so that the
    union over ranks (the set a validation loss is summed over) does not depend on dp_size."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    holdout = _holdout_every(cfg.val_fraction)
    if holdout == 0:
        raise ValueError("val_fraction is 0: there are no validation documents")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    streams = [
        _SourceStream(src, tokenizer, seq_length, holdout, validation=True) for src in cfg.sources
    ]
    samples: list[list[int]] = []
    while streams and len(samples) < num_samples:
        for stream in list(streams):
            if len(samples) == num_samples:
                break
            sample = stream.next_sample()
            if sample is None:
                streams.remove(stream)
            else:
                samples.append(sample)
    if not samples:
        raise ValueError(
            f"the validation documents hold no sample of {seq_length + 1} tokens; "
            "raise val_fraction or add data"
        )
    n = len(samples)
    share = samples[dp_rank * n // dp_size : (dp_rank + 1) * n // dp_size]
    return torch.tensor(share, dtype=torch.int64).view(len(share), seq_length + 1)
