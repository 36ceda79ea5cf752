"""Per-layer routing statistics of a training step, for the whole run: every micro-batch of
the global batch, summed over the data x context ranks (and gathered from the pipeline
stages), so that what is logged is the run's activation ratio and attention span, not one
rank's slice of the data and of the sequence.

The heat map's row (which tokens of the first sequence each layer activated) is gathered
over the context-parallel ranks: the whole sequence, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.dims import ParallelDims
from parallel.pipeline import merge_over_stages
from pretrain.model.layer import LayerStats

# Per-micro-batch statistics of the layers one model chunk holds, keyed by the chunk's first
# global layer: {first layer: [micro-batch][layer of the chunk]}.
ChunkStats = dict[int, list[list[LayerStats]]]


@dataclass
class LayerSummary:
    """One layer over a whole step of the run."""

    activated: int  # tokens that ran the GAU
    tokens: int
    span_sum: float  # sum of original-position distances over attended pairs
    span_pairs: int
    heat: Tensor  # [L] bool: the first sequence's activated tokens, whole sequence
    imbalance: tuple[float, float] | None = None  # attention work max/mean before, after

    @property
    def ratio(self) -> float:
        return self.activated / max(self.tokens, 1)

    @property
    def span(self) -> float:
        return self.span_sum / max(self.span_pairs, 1)


def summarize(stats: ChunkStats, dims: ParallelDims) -> list[LayerSummary]:
    """Every layer's summary in layer order, the same on every rank. Collective over the
    data x context group, the context group and the pipeline group: every rank calls it at
    the same steps."""
    local: dict[int, list[LayerSummary]] = {}
    for first, micro_batches in sorted(stats.items()):
        if not micro_batches[0]:  # no routed layers (the Transformer baseline)
            local[first] = []
            continue
        # Per layer: activated tokens, tokens, span sum, attended pairs (summed exactly:
        # counts are integers well below 2^53).
        rows = [[_counts(s) for s in micro] for micro in micro_batches]
        totals = torch.tensor(rows, dtype=torch.float64).sum(0)
        imbalances = _mean_imbalance(micro_batches)
        if dims.replicas > 1:
            totals = totals.to(dims.device)
            dist.all_reduce(totals, group=dims.dp_group())
            totals = totals.cpu()
        heats = [_whole_sequence(s.activated[:, 0], dims) for s in micro_batches[0]]
        local[first] = [
            LayerSummary(
                activated=int(t[0]),
                tokens=int(t[1]),
                span_sum=float(t[2]),
                span_pairs=int(t[3]),
                heat=heat,
                imbalance=imb,
            )
            for t, heat, imb in zip(totals, heats, imbalances, strict=True)
        ]
    merged = merge_over_stages(local, dims)
    return [s for first in sorted(merged) for s in merged[first]]


def _counts(s: LayerStats) -> list[float]:
    return [float(s.activated.sum()), s.activated.numel(), float(s.span_sum), float(s.span_pairs)]


def _mean_imbalance(micro_batches: Sequence[Sequence[LayerStats]]) -> list:
    """Dispatch's imbalance (max/mean work before and after balancing) per layer, averaged
    over the micro-batches (the same on every rank of a dispatch group); None without."""
    out = []
    for i, s in enumerate(micro_batches[0]):
        if s.imbalance is None:
            out.append(None)
            continue
        pairs = [m[i].imbalance for m in micro_batches]
        out.append(tuple(sum(p[k] for p in pairs) / len(pairs) for k in (0, 1)))
    return out


def _whole_sequence(column: Tensor, dims: ParallelDims) -> Tensor:
    """One sequence's [L/cp] activation flags -> [L], gathered over the context group."""
    column = column.detach().to(torch.uint8)
    if dims.cp_size > 1:
        parts = [torch.empty_like(column) for _ in range(dims.cp_size)]
        dist.all_gather(parts, column.contiguous(), group=dims.context.group())
        column = torch.cat(parts)
    return column.bool().cpu()
