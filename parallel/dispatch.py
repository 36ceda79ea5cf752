"""Load-balanced dispatch of sparse attention work across ranks.

After routing, the ranks of a context-parallel group hold different numbers of activated
tokens, so their local-attention work differs and the slowest rank sets the step time. The
work comes in independent *items*: one block of ``window`` compressed queries of one sequence
with its ``2 * window`` keys and values (everything the block's attention needs). Like an MoE
token dispatcher, every rank learns every rank's item count (one all-gather of one integer),
all ranks compute the same assignment — the items in global order cut into equal contiguous
shares — and an all-to-all moves the items there; the results come back by the reverse
all-to-all. Both all-to-alls are megatron-core's differentiable mapping, so gradients
return to the ranks that own the tokens and the result is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def count_items(counts: Tensor, window: int) -> int:
    """Attention work items on one rank: sum over sequences of ceil(activated / window)."""
    return int((-(-counts // window)).sum())


def balance(items: list[int]) -> list[list[int]]:
    """``send[i][j]``: items rank ``i`` sends to rank ``j`` (``send[i][i]`` stay) so that
    rank ``j`` ends with the ``j``-th of ``len(items)`` equal contiguous shares of the items
    in global (rank) order. Most items stay where they are when the load is already even."""
    ranks, total = len(items), sum(items)
    owned = [0]
    for n in items:
        owned.append(owned[-1] + n)
    share = [total * j // ranks for j in range(ranks + 1)]  # rank j computes [share[j], share[j+1])
    return [
        [max(0, min(owned[i + 1], share[j + 1]) - max(owned[i], share[j])) for j in range(ranks)]
        for i in range(ranks)
    ]


def imbalance(work: Sequence[float]) -> float:
    """max / mean over ranks (1.0 when there is no work)."""
    mean = sum(work) / len(work)
    return max(work) / mean if mean > 0 else 1.0


class Dispatch:
    """One exchange of ``items`` rows over ``group``: ``send`` them to the ranks that compute
    them, then ``gather`` the results back into the original order."""

    def __init__(self, local_items: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        counts = torch.tensor([local_items], dtype=torch.long)
        everyone = [torch.zeros_like(counts) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, counts, group=group)
        self.items = [int(c) for c in everyone]
        matrix = balance(self.items)
        self.send_sizes = matrix[self.rank]
        self.recv_sizes = [row[self.rank] for row in matrix]
        self.before = imbalance(self.items)
        self.after = imbalance([sum(row[j] for row in matrix) for j in range(len(matrix))])

    def send(self, rows: Tensor) -> Tensor:
        """This rank's items (rows, in order) -> the items it computes."""
        return self._exchange(rows, self.recv_sizes, self.send_sizes)

    def gather(self, results: Tensor) -> Tensor:
        """Results of the computed items -> the results of this rank's own items, in order."""
        return self._exchange(results, self.send_sizes, self.recv_sizes)

    def _exchange(self, rows: Tensor, out_sizes: list[int], in_sizes: list[int]) -> Tensor:
        if rows.is_floating_point():
            from megatron.core.tensor_parallel.mappings import all_to_all

            return all_to_all(self.group, rows, out_sizes, in_sizes)
        out = rows.new_empty(sum(out_sizes), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), out_sizes, in_sizes, group=self.group)
        return out
