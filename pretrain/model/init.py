"""Initialisers of the reference implementation (github.com/renll/SeqBoat)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def trunc_normal_(tensor: Tensor, std: float, mean: float = 0.0) -> Tensor:
    """Normal(mean, std) truncated at +-2 std, as the reference's initialiser."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=mean - 2 * std, b=mean + 2 * std)


def init_linear_(layer: nn.Module, std: float = 0.02) -> nn.Module:
    """TN(0, std) weight, zero bias; for nn.Linear and megatron-core's parallel linears."""
    trunc_normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
