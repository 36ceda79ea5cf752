"""Rotary position embedding over explicit (original) positions.

Consecutive pairs (x[2i], x[2i+1]) are rotated by pos * base^(-2i/Z). SeqBoat rotates the
compressed queries and keys by their *original* positions, so positions are a tensor, not
an implicit arange.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """x: [..., Z] (Z even); positions: x.shape[:-1] (or broadcastable), any numeric dtype."""
    half = x.shape[-1] // 2
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=dtype) * 2.0 / x.shape[-1])
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq
    cos, sin = angles.cos(), angles.sin()
    pairs = x.to(dtype).unflatten(-1, (half, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
