"""Lanes: the unit of data work, defined independently of the data-parallel size.

Row ``j`` of every global batch comes from lane ``j`` (there are ``global_batch_size``
lanes). A lane owns, in every source, the training documents whose index ``g`` in that
source's infinite train stream (its train documents, epoch after epoch) satisfies
``g % lanes == j``; it has its own packers, its own mixture and shuffle random streams and
its own shuffle buffer. Nothing a lane produces depends on which rank builds it, so a rank
builds only the lanes of its rows (1/DP of the work) and the global sample order is the
same on any number of ranks. The idea is MosaicML streaming's "canonical nodes" and
Megatron's global sample index: the partition of the data is fixed by the run, the ranks
only pick their part of it.

A rank reads each source's documents once for all its lanes (:class:`DocumentReader`): it
tokenizes only its lanes' documents, but a streamed source has no index, so the rank still
scans (and discards) the other lanes' raw documents. That scan is the per-rank constant of
the streamed path; pre-tokenized shards (``tokenized:`` sources) have none.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import numpy as np
import torch

from data.config import SourceConfig
from data.packing import Packer
from data.prepared import PreparedDataset
from data.sources import describe, documents, open_source
from data.tokenizer import Tokenizer

# Independent counter-based random streams (seeded ``[seed, stream, lane, index]``).
MIXTURE, SHUFFLE = 0, 1


def _position(dataset_state: dict, epoch: int, doc_index: int, g: int) -> dict[str, Any]:
    """A point in a source's train stream: the dataset's state before the next raw document,
    that document's index in its epoch (train and held-out), and the index ``g`` the next
    train document gets in the infinite train stream."""
    return {"dataset": dataset_state, "epoch": epoch, "doc_index": doc_index, "g": g}


class DocumentReader:
    """One source's training documents on one rank, dealt to the lanes this rank builds.

    Documents are read in order and queued (as text, untokenized) for the lane they belong
    to; the other lanes' documents are skipped. A lane's resume point is the position just
    before the first document it has not tokenized yet, so queued documents are never
    saved: they are read again on resume.
    """

    def __init__(
        self,
        src: SourceConfig,
        tokenizer: Tokenizer,
        holdout: int,
        lanes: int,
        owned: list[int],
        work: list[int],
    ) -> None:
        self._src = src
        self._tokenizer = tokenizer
        self._holdout = holdout
        self._lanes = lanes
        self._work = work  # [characters tokenized, tokens read] on this rank (for benches)
        # One dataset for all epochs: reopening costs a `load_dataset` call each time, and
        # `set_epoch` would reshuffle the shards. Loading the pre-iteration state rewinds it.
        self._dataset = open_source(src)
        self._start = self._dataset.state_dict()
        self._queues: dict[int, deque[tuple[dict, str]]] = {lane: deque() for lane in owned}
        self._want = {lane: lane for lane in owned}  # next g each lane has not queued yet
        self._seek(_position(self._start, 0, 0, 0))
        self._read_one()  # an empty source fails here, naming itself, not at the first step

    def _seek(self, position: dict[str, Any]) -> None:
        self._dataset.load_state_dict(position["dataset"])
        self._documents = documents(self._src, self._dataset)
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
        dataset's live state, valid only until the next document is read)."""
        if self._here["dataset"] is None:
            self._here = {**self._here, "dataset": self._dataset.state_dict()}
        return self._here

    def _read_one(self) -> None:
        here = self._here
        k = self._holdout
        held_out = k > 0 and here["doc_index"] % k == k - 1
        lane = here["g"] % self._lanes
        ours = not held_out and self._want.get(lane) == here["g"]
        if ours:  # keep the position before it: the lane resumes there
            here = self._position_here()
        example = next(self._documents, None)
        if example is None:
            # k >= 2, so document 0 is always a train document: no documents, no training.
            if here["doc_index"] == 0:
                raise ValueError(f"data source {describe(self._src)} has no training documents")
            if here["epoch"] == 0 and here["g"] < self._lanes:
                print(
                    f"seqboat: warning: data source {describe(self._src)} has {here['g']} "
                    f"training documents, fewer than the {self._lanes} lanes (rows of the "
                    "global batch): several rows read the same documents at the same time",
                    file=sys.stderr,
                )
            self._seek(_position(self._start, here["epoch"] + 1, 0, here["g"]))
            return
        g = here["g"] + (not held_out)
        # The dataset's state is copied only where a position is kept (a document of our
        # lanes, a lane's resume point): most documents a rank reads are other ranks'.
        self._here = _position(None, here["epoch"], here["doc_index"] + 1, g)
        if ours:
            self._queues[lane].append((here, example["text"]))
            self._want[lane] += self._lanes

    def lane_state(self, lane: int) -> dict[str, Any]:
        """Where ``lane`` resumes: its first untokenized document and a position at or
        before it."""
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
            if state["next"] % self._lanes != lane:
                raise ValueError(f"data state of lane {lane} points at another lane's document")
            self._queues[lane].clear()
            self._want[lane] = state["next"]
        # Start at the earliest resume point; later lanes skip documents before theirs.
        earliest = min(
            (s["at"] for s in states.values()), key=lambda p: (p["epoch"], p["doc_index"])
        )
        self._seek(earliest)


class PreparedReader:
    """One prepared (pre-tokenized) source's training documents for the lanes of this rank.

    Train document ``g`` of the infinite train stream is found by arithmetic (the same
    hold-out rule as a streamed source's), and read from the memory-mapped shards: a rank
    reads only its lanes' documents, and a lane's resume point is one integer.
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
        readers: list[DocumentReader | PreparedReader],
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
