"""Context (sequence) parallelism: each rank of a context-parallel group holds a contiguous
chunk of every sequence, for every layer. What crosses ranks is small and does not grow with
the sequence: the EMA's states (``parallel/scan.py``) and the last ``window`` activated
tokens before each chunk (``parallel/halo.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its context-parallel group."""

    size: int = 1
    rank: int = 0
    # Where local-attention work is balanced (parallel/dispatch.py): "off", over the
    # "context" group, or over the "data" x context group.
    dispatch: str = "off"

    @property
    def active(self) -> bool:
        return self.size > 1

    def group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_context_parallel_group()

    def dispatch_group(self) -> dist.ProcessGroup | None:
        """The group attention work is balanced over, or None (no dispatch)."""
        if self.dispatch == "off":
            return None
        from megatron.core import parallel_state

        group = (
            self.group()
            if self.dispatch == "context"
            else parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        return group if dist.get_world_size(group) > 1 else None

    def chunk(self, tokens: Tensor) -> Tensor:
        """This rank's part of a batch of samples [B, L+1] (inputs and shifted targets):
        [B, L/cp + 1], the targets' extra token included."""
        if not self.active:
            return tokens
        length = tokens.shape[1] - 1
        if length % self.size:
            raise ValueError(
                f"sequence length {length} is not divisible by context size {self.size}"
            )
        part = length // self.size
        return tokens[:, self.rank * part : (self.rank + 1) * part + 1]

    def positions(self, length: int, device: torch.device) -> Tensor:
        """Original positions of this rank's ``length`` local tokens."""
        return torch.arange(self.rank * length, (self.rank + 1) * length, device=device)
