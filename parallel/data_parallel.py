"""Data parallelism: every rank of a data-parallel group holds the same (tensor-parallel
shard of the) model and its own rows of each global batch; gradients are averaged."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from parallel.comm import all_reduce_coalesced


def data_parallel_group(with_context: bool = False) -> dist.ProcessGroup:
    """The data-parallel group; ``with_context``: the ranks of the context-parallel groups
    too (they hold different tokens of the same model, like data-parallel ranks)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=with_context)


def average_gradients(model: nn.Module, group: dist.ProcessGroup, size: int) -> None:
    """Mean of every gradient over the group (one coalesced all-reduce). Every rank's loss is
    a mean over the same number of tokens, so this is the gradient of the global mean."""
    if size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    all_reduce_coalesced(grads, group, scale=1.0 / size)


def average(value: Tensor, group: dist.ProcessGroup, size: int) -> Tensor:
    """The mean of a scalar tensor over the group."""
    if size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, group=group)
    return value / size
