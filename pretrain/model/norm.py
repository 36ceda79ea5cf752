"""Normalisation layers selectable by config."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.config import NORM_KINDS


class ScaleNorm(nn.Module):
    """g * x / ||x|| with one learned scalar g (initialised to sqrt(D))."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.tensor(float(width) ** 0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


def make_norm(kind: str, width: int, affine: bool = True) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(width, elementwise_affine=affine)
    if kind == "rmsnorm":
        return nn.RMSNorm(width, elementwise_affine=affine)
    if kind == "scalenorm":
        return ScaleNorm(width)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORM_KINDS}")
