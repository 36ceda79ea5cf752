"""Lanes: the unit of data work, defined independently of the data-parallel size.

Row ``j`` of every global batch comes from lane ``j`` (there are ``global_batch_size``
lanes). A lane has its own packers, its own mixture and shuffle random streams and its own
shuffle buffer, and owns a fixed part of every source's training documents. Nothing a lane
produces depends on which rank builds it, so a rank builds only the lanes of its rows (1/DP
of the work) and the global sample order is the same on any number of ranks. The idea is
MosaicML streaming's "canonical nodes" and Megatron's global sample index: the partition of
the data is fixed by the run, the ranks only pick their part of it.

Which documents a lane owns:

- A prepared source (``tokenized:``), and a streamed source read in one order: the training
  documents whose index ``g`` in the source's infinite train stream (its train documents,
  epoch after epoch) satisfies ``g % lanes == j``. A prepared document is found by
  arithmetic; a streamed source has no index, so a rank scans (and discards) the other
  lanes' raw documents (:class:`DocumentReader`): the per-rank constant of streaming.
- A streamed source split by file (``split_files``, :func:`lane_groups`): its files (the
  ``datasets`` shards) and the lanes are both cut into ``min(files, lanes)`` contiguous
  blocks; lane group ``i`` reads only file block ``i`` (its files in order, epoch after
  epoch), whose train documents it deals round robin to its lanes. A rank's contiguous
  lanes fall in about ``groups / DP`` groups, so it opens and scans about ``files / DP``
  files, like ``datasets.distributed.split_dataset_by_node`` with whole shards per node,
  but with the assignment fixed by the lanes, not by the number of ranks.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import datasets
import numpy as np
import torch

from data.config import SourceConfig
from data.packing import Packer
from data.prepared import PreparedDataset
from data.sources import describe, documents
from data.tokenizer import Tokenizer

# Independent counter-based random streams (seeded ``[seed, stream, lane, index]``).
MIXTURE, SHUFFLE = 0, 1


def block(n: int, parts: int, i: int) -> range:
    """Block ``i`` of ``range(n)`` cut into ``parts`` contiguous blocks whose sizes differ by
    at most one (the first ``n % parts`` are longer), as ``datasets``' contiguous shards."""
    div, mod = divmod(n, parts)
    start = div * i + min(i, mod)
    return range(start, start + div + (i < mod))


def lane_groups(files: int, lanes: int) -> list[tuple[range, range]]:
    """``(lanes, files)`` of each lane group of a source split by file: ``min(files, lanes)``
    groups, each a contiguous block of the lanes and the same-numbered block of the files.
    Depends only on the two counts, never on the number of ranks."""
    groups = min(files, lanes)
    return [(block(lanes, groups, i), block(files, groups, i)) for i in range(groups)]


def _position(
    dataset_state: dict | None, epoch: int, unit: int, doc_index: int, g: int
) -> dict[str, Any]:
    """A point in a lane group's train stream: the state of its unit ``unit`` (a file, or
    the whole source) before the next raw document, that document's index in the unit
    (train and held-out), and the index ``g`` the next train document gets in the group's
    infinite train stream (its units in order, epoch after epoch)."""
    return {"dataset": dataset_state, "epoch": epoch, "unit": unit, "doc_index": doc_index, "g": g}


class DocumentReader:
    """A streamed source's training documents for one lane group, on one rank.

    The group reads its units (the whole source, or its block of files) in order, epoch
    after epoch; document ``d`` of a unit is held out iff ``d % holdout == holdout - 1``;
    train document ``g`` of the group goes to lane ``lanes[g % len(lanes)]``. Documents are
    read in order and queued (as text, untokenized) for the owned lane they belong to; the
    other lanes' documents are skipped. A lane's resume point is the position just before
    the first document it has not tokenized yet, so queued documents are never saved: they
    are read again on resume.
    """

    def __init__(
        self,
        src: SourceConfig,
        tokenizer: Tokenizer,
        units: list[datasets.IterableDataset],
        holdout: int,
        lanes: range,
        owned: list[int],
        work: list[int],
        where: str = "",
        warned: set[str] | None = None,
    ) -> None:
        self._src = src
        self._tokenizer = tokenizer
        self._holdout = holdout
        self._first, self._lanes = lanes.start, len(lanes)
        self._where = where  # which part of the source, for messages ("" = all of it)
        # Sources already warned about (shared by a source's groups: one warning, not one a
        # group).
        self._warned = set() if warned is None else warned
        self._work = work  # [characters tokenized, tokens read, raw documents read] (benches)
        # One dataset per unit for all epochs: reopening costs a `load_dataset` call, and
        # `set_epoch` would reshuffle the shards. Loading the pre-iteration state rewinds it.
        self._units = units
        self._starts = [unit.state_dict() for unit in units]
        self._queues: dict[int, deque[tuple[dict, str]]] = {lane: deque() for lane in owned}
        self._want = {lane: lane - self._first for lane in owned}  # next g not queued yet
        self._seek(_position(self._starts[0], 0, 0, 0, 0))
        # An empty source fails here, naming itself, not at the first step.
        while not self._read_one():
            pass

    @property
    def lanes(self) -> list[int]:
        """The lanes of this rank that this reader feeds."""
        return list(self._queues)

    def _seek(self, position: dict[str, Any]) -> None:
        dataset = self._units[position["unit"]]
        dataset.load_state_dict(position["dataset"])
        self._documents = documents(self._src, dataset)
        # `IterableDataset.state_dict()` reflects a loaded state only once iteration has
        # started, so a seek keeps the loaded copy (see _position_here).
        self._here = position

    def take(self, lane: int) -> list[int]:
        """The tokens of the next document of ``lane`` (an owned lane)."""
        queue = self._queues[lane]
        while not queue:
            self._read_one()
        _, text = queue.popleft()
        self._work[0] += len(text)
        return self._tokenizer.encode(text)

    def _position_here(self) -> dict[str, Any]:
        """The current position, its dataset state made concrete (``None`` stands for the
        unit's live state, valid only until the next document is read)."""
        if self._here["dataset"] is None:
            state = self._units[self._here["unit"]].state_dict()
            self._here = {**self._here, "dataset": state}
        return self._here

    def _read_one(self) -> bool:
        """Reads the next raw document; False where a unit ended instead."""
        here = self._here
        k = self._holdout
        held_out = k > 0 and here["doc_index"] % k == k - 1
        lane = self._first + here["g"] % self._lanes
        ours = not held_out and self._want.get(lane) == here["g"]
        if ours:  # keep the position before it: the lane resumes there
            here = self._position_here()
        example = next(self._documents, None)
        if example is None:
            self._end_of_unit(here)
            return False
        self._work[2] += 1
        g = here["g"] + (not held_out)
        # The dataset's state is copied only where a position is kept (a document of our
        # lanes, a lane's resume point): most documents a rank reads are other ranks'.
        self._here = _position(None, here["epoch"], here["unit"], here["doc_index"] + 1, g)
        if ours:
            self._queues[lane].append((here, example["text"]))
            self._want[lane] += self._lanes
        return True

    def _end_of_unit(self, here: dict[str, Any]) -> None:
        unit, epoch, g = here["unit"] + 1, here["epoch"], here["g"]
        if unit < len(self._units):
            self._seek(_position(self._starts[unit], epoch, unit, 0, g))
            return
        if epoch == 0 and g == 0:  # document 0 of a unit is a train document (k >= 2)
            raise ValueError(
                f"data source {describe(self._src)} has no training documents{self._where}"
            )
        if epoch == 0 and g < self._lanes and describe(self._src) not in self._warned:
            self._warned.add(describe(self._src))
            print(
                f"seqboat: warning: data source {describe(self._src)}{self._where} has {g} "
                f"training documents, fewer than the {self._lanes} lanes (rows of the "
                "global batch) that read them: several rows read the same documents at the "
                "same time",
                file=sys.stderr,
            )
        self._seek(_position(self._starts[0], epoch + 1, 0, 0, g))

    def lane_state(self, lane: int) -> dict[str, Any]:
        """Where ``lane`` resumes: its first untokenized document (``next``, its index in the
        group's train stream) and a position at or before it (``at``)."""
        queue = self._queues[lane]
        if queue:
            at = queue[0][0]
            return {"next": at["g"], "at": at}
        return {"next": self._want[lane], "at": self._position_here()}

    def load_lane_states(self, states: dict[int, dict[str, Any]]) -> None:
        """Resume the owned lanes (``states``: one :meth:`lane_state` per owned lane)."""
        if set(states) != set(self._queues):
            raise ValueError("the data state does not hold this rank's lanes")
        for lane, state in states.items():
            if self._first + state["next"] % self._lanes != lane:
                raise ValueError(f"data state of lane {lane} points at another lane's document")
            self._queues[lane].clear()
            self._want[lane] = state["next"]
        # States saved before units existed read the whole source: unit 0.
        positions = [{"unit": 0, **s["at"]} for s in states.values()]
        # Start at the earliest resume point; later lanes skip documents before theirs.
        self._seek(min(positions, key=lambda p: (p["epoch"], p["unit"], p["doc_index"])))


class PreparedReader:
    """One prepared (pre-tokenized) source's training documents for the lanes of this rank.

    Train document ``g`` of the infinite train stream is found by arithmetic (the same
    hold-out rule as a streamed source read in one order), and read from the memory-mapped
    shards: a rank reads only its lanes' documents, and a lane's resume point is one integer.
    """

    def __init__(
        self,
        src: SourceConfig,
        dataset: PreparedDataset,
        holdout: int,
        lanes: int,
        owned: list[int],
        work: list[int],
    ) -> None:
        self._dataset = dataset
        self._holdout = holdout
        self._lanes = lanes
        self._work = work
        n = dataset.documents
        self._train = n - n // holdout if holdout else n
        if self._train == 0:
            raise ValueError(f"data source {describe(src)} has no training documents")
        if self._train < lanes:
            print(
                f"seqboat: warning: data source {describe(src)} has {self._train} training "
                f"documents, fewer than the {lanes} lanes (rows of the global batch): several "
                "rows read the same documents at the same time",
                file=sys.stderr,
            )
        self._want = {lane: lane for lane in owned}

    @property
    def lanes(self) -> list[int]:
        """The lanes of this rank that this reader feeds."""
        return list(self._want)

    def take(self, lane: int) -> list[int]:
        g = self._want[lane]
        self._want[lane] = g + self._lanes
        t = g % self._train
        # Documents k-1, 2k-1, ... are held out: train document t is document t + t // (k-1).
        d = t + t // (self._holdout - 1) if self._holdout else t
        tokens = self._dataset.document(d)
        self._work[1] += len(tokens)
        return tokens.tolist()

    def lane_state(self, lane: int) -> dict[str, Any]:
        return {"next": self._want[lane], "at": None}

    def load_lane_states(self, states: dict[int, dict[str, Any]]) -> None:
        if set(states) != set(self._want):
            raise ValueError("the data state does not hold this rank's lanes")
        for lane, state in states.items():
            if state["next"] % self._lanes != lane:
                raise ValueError(f"data state of lane {lane} points at another lane's document")
            self._want[lane] = state["next"]


class Lane:
    """One row of every global batch: a weighted mixture of its share of each source,
    packed and shuffled with its own counter-based random streams."""

    def __init__(
        self,
        index: int,
        readers: list[DocumentReader | PreparedReader],  # this lane's reader of each source
        eos_id: int,
        seq_length: int,
        cumulative: np.ndarray,
        shuffle_slots: int,
        seed: int,
    ) -> None:
        self.index = index
        self._readers = readers
        self._seq_length = seq_length
        self._cumulative = cumulative
        self._slots = shuffle_slots
        self._seed = seed
        self._packers = [Packer(seq_length, eos_id) for _ in readers]
        self._drawn = 0  # samples taken from this lane's mixture
        self._emitted = 0  # samples taken out of the shuffle buffer
        self._shuffle: list[torch.Tensor] = []

    @property
    def drawn(self) -> int:
        return self._drawn

    def _from_source(self, source: int) -> torch.Tensor:
        packer, reader = self._packers[source], self._readers[source]
        while not packer.has_sample():
            packer.push(reader.take(self.index))
        return torch.tensor(packer.pop(), dtype=torch.int64)

    def _draw(self) -> torch.Tensor:
        """The next sample of the (unshuffled) mixture."""
        source = 0
        if len(self._readers) > 1:
            u = np.random.default_rng([self._seed, MIXTURE, self.index, self._drawn]).random()
            source = int(np.searchsorted(self._cumulative, u, side="right"))
        self._drawn += 1
        return self._from_source(source)

    def next_sample(self) -> torch.Tensor:
        if self._slots == 0:
            return self._draw()
        while len(self._shuffle) < self._slots:
            self._shuffle.append(self._draw())
        rng = np.random.default_rng([self._seed, SHUFFLE, self.index, self._emitted])
        slot = int(rng.integers(self._slots))
        self._emitted += 1
        sample, self._shuffle[slot] = self._shuffle[slot], self._draw()
        return sample

    def state_dict(self) -> dict[str, Any]:
        return {
            "drawn": self._drawn,
            "emitted": self._emitted,
            "shuffle_buffer": (
                torch.stack(self._shuffle)
                if self._shuffle
                else torch.empty(0, self._seq_length + 1, dtype=torch.int64)
            ),
            "sources": [
                {**reader.lane_state(self.index), "packer": packer.state_dict()}
                for reader, packer in zip(self._readers, self._packers, strict=True)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters, shuffle buffer and packers; the readers are positioned by the loader."""
        buffered = len(state["shuffle_buffer"])
        if buffered not in (0, self._slots):
            raise ValueError(
                f"data state of lane {self.index} has a shuffle buffer of {buffered} samples, "
                f"this run's lanes hold {self._slots}"
            )
        self._drawn = state["drawn"]
        self._emitted = state["emitted"]
        self._shuffle = list(state["shuffle_buffer"].clone().unbind(0))
        for packer, source in zip(self._packers, state["sources"], strict=True):
            packer.load_state_dict(source["packer"])
