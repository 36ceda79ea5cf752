"""Small collective helpers shared by the parallel modules."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def all_reduce_coalesced(
    tensors: list[Tensor], group: dist.ProcessGroup | None, scale: float = 1.0
) -> None:
    """Sums ``tensors`` in place across ``group`` with one collective (then scales them)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_object(obj: Any, distributed: bool) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself on one process)."""
    if not distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
