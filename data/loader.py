"""Deterministic, resumable, rank-aware batches from a weighted mixture of sources.

The global batch's rows come from a fixed number of lanes (``data/lanes.py``), one per row,
independent of the data-parallel size: each rank builds only the lanes of its rows, and the
data order does not depend on the number of ranks, so a run can resume on another one. All
randomness is counter based (``numpy`` generators seeded with ``[seed, stream, lane,
index]``): the state to resume is counters and buffers, no RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.config import DataConfig, SourceConfig
from data.lanes import DocumentReader, Lane, PreparedReader, lane_groups
from data.packing import Packer
from data.prepared import PreparedDataset
from data.sources import describe, describe_files, documents, open_source, units
from data.tokenizer import Tokenizer


def _holdout_every(val_fraction: float) -> int:
    """``k`` such that document ``d`` of each source is held out iff ``d % k == k - 1``
    (0: nothing is held out)."""
    if not 0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    return round(1 / val_fraction) if val_fraction else 0


def open_prepared(src: SourceConfig, tokenizer: Tokenizer) -> PreparedDataset:
    """The prepared directory of a ``tokenized:`` source, checked against ``tokenizer``."""
    dataset = PreparedDataset(src.tokenized)
    dataset.check_tokenizer(
        tokenizer.vocab_size, tokenizer.eos_id, getattr(tokenizer, "fingerprint", None)
    )
    dataset.check()
    return dataset


def _held_out_documents(
    src: SourceConfig, tokenizer: Tokenizer, holdout: int
) -> Iterator[list[int]]:
    """The tokens of ``src``'s held-out documents (``d % holdout == holdout - 1``), in order."""
    if src.tokenized:
        dataset = open_prepared(src, tokenizer)
        for d in range(holdout - 1, dataset.documents, holdout):
            yield dataset.document(d).tolist()
        return
    for unit in units(src, open_source(src)):  # held out by index in the unit
        for d, example in enumerate(documents(src, unit)):
            if d % holdout == holdout - 1:
                yield tokenizer.encode(example["text"])


class _ValidationStream:
    """One source's held-out documents, tokenized lazily and packed; one pass."""

    def __init__(
        self, src: SourceConfig, tokenizer: Tokenizer, seq_length: int, holdout: int
    ) -> None:
        self.packer = Packer(seq_length, tokenizer.eos_id)
        self._documents = _held_out_documents(src, tokenizer, holdout)

    def next_sample(self) -> list[int] | None:
        """The next packed sample, or None when the held-out documents run out."""
        while not self.packer.has_sample():
            tokens = next(self._documents, None)
            if tokens is None:
                return None
            self.packer.push(tokens)
        return self.packer.pop()


Reader = DocumentReader | PreparedReader


def _source_readers(
    src: SourceConfig,
    tokenizer: Tokenizer,
    holdout: int,
    lanes: int,
    owned: list[int],
    work: list[int],
) -> tuple[list[Reader], dict[str, int] | None]:
    """The readers of ``src`` that feed this rank's lanes (``owned``), and how the source
    is split over the lanes (``None``: read in one order, every rank reading all of it)."""
    if src.tokenized:
        if src.split_files:
            raise ValueError(
                f"data source {describe(src)}: split_files is for streamed sources (a "
                "tokenized source is already read by each rank only for its lanes)"
            )
        dataset = open_prepared(src, tokenizer)
        return [PreparedReader(src, dataset, holdout, lanes, owned, work)], None
    parts = units(src, open_source(src))
    if len(parts) == 1:
        return [DocumentReader(src, tokenizer, parts, holdout, range(lanes), owned, work)], None
    readers: list[Reader] = []
    warned: set[str] = set()
    for group, files in lane_groups(len(parts), lanes):
        mine = [lane for lane in owned if lane in group]
        if mine:  # a rank opens only the files of its lanes' groups
            where = (
                f" in {describe_files(src, files, len(parts))} (split_files: the only files "
                f"of lanes {group.start}-{group.stop - 1})"
            )
            group_units = [parts[f] for f in files]
            readers.append(
                DocumentReader(
                    src, tokenizer, group_units, holdout, group, mine, work, where, warned
                )
            )
    return readers, {"files": len(parts), "groups": min(len(parts), lanes)}


def _layout_text(layout: dict[str, int] | None) -> str:
    if layout is None:
        return "read in one order (split_files off, or a single file)"
    return f"split by file over lane groups ({layout['files']} files, {layout['groups']} groups)"


class PretrainLoader:
    """Infinite iterator of this rank's rows of each global batch:
    LongTensor ``[global_batch_size // dp_size, seq_length + 1]``.

    Row ``j`` of every global batch is the next sample of lane ``j`` (``data/lanes.py``);
    this rank builds only the lanes of its rows, so its data work is 1/``dp_size`` of the
    global batch's and the batches (concatenated over ranks) do not depend on ``dp_size``.
    """

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
        self._seq_length = seq_length
        self._lanes = global_batch_size
        owned = list(
            range(
                dp_rank * global_batch_size // dp_size, (dp_rank + 1) * global_batch_size // dp_size
            )
        )
        cumulative = np.cumsum(weights / weights.sum())
        cumulative[-1] = 1.0  # so that every u in [0, 1) falls in some source
        # ``shuffle_buffer`` samples in all, spread over the lanes.
        self._slots = -(-cfg.shuffle_buffer // self._lanes)
        # This rank's data work: [characters tokenized, prepared tokens read, streamed raw
        # documents read] (for benches and tests).
        self._work = [0, 0, 0]
        self._sources = cfg.sources
        self._readers: list[list[Reader]] = []  # per source: its readers on this rank
        self._layouts: list[dict[str, int] | None] = []
        lane_readers: dict[int, list[Reader]] = {lane: [] for lane in owned}
        for src in cfg.sources:
            readers, layout = _source_readers(
                src, tokenizer, holdout, self._lanes, owned, self._work
            )
            self._readers.append(readers)
            self._layouts.append(layout)
            for reader in readers:
                for lane in reader.lanes:
                    lane_readers[lane].append(reader)
        eos = tokenizer.eos_id
        self._rows = [
            Lane(lane, lane_readers[lane], eos, seq_length, cumulative, self._slots, cfg.seed)
            for lane in owned
        ]

    @property
    def chars_tokenized(self) -> int:
        """Characters of the streamed documents this rank has tokenized so far."""
        return self._work[0]

    @property
    def samples_drawn(self) -> int:
        """Samples this rank's lanes have taken from their mixtures (shuffle buffers included)."""
        return sum(lane.drawn for lane in self._rows)

    @property
    def documents_scanned(self) -> int:
        """Raw documents this rank has read from its streamed sources: its lanes' and those
        of the other lanes it had to skip over (the files of its lanes' groups)."""
        return self._work[2]

    @property
    def tokens_read(self) -> int:
        """Tokens of prepared documents this rank has read so far."""
        return self._work[1]

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> torch.Tensor:
        return torch.stack([lane.next_sample() for lane in self._rows])

    def state_dict(self, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
        """Everything needed to resume exactly: the state of every lane this rank builds, or
        with ``group`` (the data-parallel ranks, a collective) of every lane of the run, so
        that any rank's copy resumes any number of ranks."""
        state = {
            "seq_length": self._seq_length,
            "lanes": self._lanes,
            "layouts": self._layouts,  # per source: how it is split over the lanes
            "lane_states": {lane.index: lane.state_dict() for lane in self._rows},
        }
        return gather_lane_states(state, group)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seq_length"] != self._seq_length:
            raise ValueError(
                f"data state was saved with seq_length {state['seq_length']}, "
                f"this run uses {self._seq_length}"
            )
        if "lanes" not in state:
            raise ValueError(
                "data state was saved by a loader without lanes (before issue 15); "
                "it cannot be resumed by this version"
            )
        if state["lanes"] != self._lanes:
            raise ValueError(
                f"data state was saved with {state['lanes']} lanes (global_batch_size), "
                f"this run has {self._lanes}"
            )
        # States saved before split_files read every source in one order.
        layouts = state.get("layouts", [None] * len(_state_sources(state)))
        if len(layouts) != len(self._readers):
            raise ValueError(
                f"data state has {len(layouts)} sources, the config has {len(self._readers)}"
            )
        for i, (then, now) in enumerate(zip(layouts, self._layouts, strict=True)):
            if then != now:
                hint = ""
                if (then is None) != (now is None):
                    hint = f" (set split_files: {str(then is not None).lower()} to resume it)"
                raise ValueError(
                    f"data state was saved with data source {i} ({describe(self._sources[i])}) "
                    f"{_layout_text(then)}; this run has it {_layout_text(now)}, which gives "
                    f"other samples: it cannot resume this state{hint}"
                )
        saved = state["lane_states"]
        missing = [lane.index for lane in self._rows if lane.index not in saved]
        if missing:
            raise ValueError(f"data state lacks lanes {missing[:8]} of this rank")
        for lane in self._rows:
            if len(saved[lane.index]["sources"]) != len(self._readers):
                raise ValueError(
                    f"data state has {len(saved[lane.index]['sources'])} sources, the config "
                    f"has {len(self._readers)}"
                )
            lane.load_state_dict(saved[lane.index])
        for source, readers in enumerate(self._readers):
            for reader in readers:
                reader.load_lane_states(
                    {lane: saved[lane]["sources"][source] for lane in reader.lanes}
                )


def _state_sources(state: dict[str, Any]) -> list[Any]:
    """The per-source entries of any one lane of ``state`` (the sources it was saved with)."""
    lanes = state["lane_states"]
    return next(iter(lanes.values()))["sources"] if lanes else []


def gather_lane_states(state: dict[str, Any], group: dist.ProcessGroup | None) -> dict[str, Any]:
    """``state`` with the lanes of every rank of ``group`` (all-gather; the identity without
    a group or with a group of one)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return state
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, state, group=group)
    return merge_lane_states(parts)


def merge_lane_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state holding the lanes of all ``states`` (the ranks' :meth:`state_dict`)."""
    lanes = {index: lane for state in states for index, lane in state["lane_states"].items()}
    return {**states[0], "lane_states": dict(sorted(lanes.items()))}


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
    streams = [_ValidationStream(src, tokenizer, seq_length, holdout) for src in cfg.sources]
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
