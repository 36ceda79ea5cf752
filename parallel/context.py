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

    @property
    def active(self) -> bool:
        return self.size > 1

    @classmethod
    def from_parallel_state(cls) -> ContextParallel:
        from megatron.core import parallel_state

        return cls(
            size=parallel_state.get_context_parallel_world_size(),
            rank=parallel_state.get_context_parallel_rank(),
        )

    def group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_context_parallel_group()

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


SINGLE_CONTEXT = ContextParallel()
