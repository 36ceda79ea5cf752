"""Normalisation layers selectable by config."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.config import NORM_KINDS
from pretrain.model.init import constant, initialize_


class ScaleNorm(nn.Module):
    """g * x / ||x|| with one learned scalar g (initialised to sqrt(D))."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.tensor(float(width) ** 0.5))
        initialize_(self.scale, constant(float(width) ** 0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


def make_norm(kind: str, width: int, affine: bool = True) -> nn.Module:
    if kind == "layernorm":
        norm: nn.Module = nn.LayerNorm(width, elementwise_affine=affine)
    elif kind == "rmsnorm":
        norm = nn.RMSNorm(width, elementwise_affine=affine)
    elif kind == "scalenorm":
        return ScaleNorm(width)
    else:
        raise ValueError(f"unknown norm {kind!r}; expected one of {NORM_KINDS}")
    # torch's own init (weight 1, bias 0), recorded for parallel/materialize.py
    if norm.weight is not None:
        initialize_(norm.weight, constant(1.0))
    if getattr(norm, "bias", None) is not None:
        initialize_(norm.bias, constant(0.0))
    return norm
