"""Shared pieces of the SeqBoat model tests (tests/model/); not a test module.

The float64 references here are written from the maths
of the SeqBoat paper (arXiv:2306.11197), not by calling the code under test: the GAU as
Python loops / dense [M, M] masked attention, rotary as complex multiplication.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        layers=2, width=16, zdim=8, hdim=16, ndim=4, window=4, max_positions=32,
        vocab_multiple=8, transformer_heads=2, transformer_ffn=32,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Pairs (x[2i], x[2i+1]) as complex numbers times exp(1j * pos * base^(-2i/Z))."""
    z = x.shape[-1]
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], z // 2, 2).contiguous())
    theta = base ** (-torch.arange(0, z, 2, dtype=F64) / z)
    angle = positions.to(F64).unsqueeze(-1) * theta
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angle), angle)).reshape(x.shape)


def dense_attention_reference(gau, q, k, v, positions, valid):
    """Dense [M, M] causal local attention: query i sees keys j with i - w <= j <= i that
    are valid (compressed-slot distance). Returns [M, B, H]; rows of invalid queries are 0."""
    length, batch = valid.shape
    w = gau.window
    dist = torch.arange(length).unsqueeze(1) - torch.arange(length).unsqueeze(0)  # i - j
    out = torch.zeros(length, batch, v.shape[-1])
    for b in range(batch):
        s = q[:, b] @ k[:, b].T
        s = s / math.sqrt(gau.zdim) if gau.attention_fn == "softmax" else s / w
        if gau.position == "simple":
            p = gau.rel_bias.numel()
            pos_dist = positions[:, b].unsqueeze(1) - positions[:, b].unsqueeze(0)
            s = s + gau.rel_bias.detach()[pos_dist.clamp(0, p - 1)]
        elif gau.position == "local":
            s = s + gau.rel_bias.detach()[dist.clamp(0, w)]
        allowed = (dist >= 0) & (dist <= w) & valid[:, b].unsqueeze(0)
        if gau.attention_fn == "softmax":
            a = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1)
            a = torch.nan_to_num(a, nan=0.0)
        else:
            a = F.relu(s).pow(2) * allowed
        out[:, b] = (a @ v[:, b]) * valid[:, b].unsqueeze(1)
    return out


def gau_reference(gau, m, positions, valid):
    """The whole GAU from its weights: shared silu projection, per-dim scale/offset,
    optional rotary, dense local attention, gating by r, output projection."""
    z = F.silu(F.linear(m, gau.z_proj.weight, gau.z_proj.bias))
    r = F.silu(F.linear(m, gau.r_proj.weight, gau.r_proj.bias))
    v = F.silu(F.linear(m, gau.v_proj.weight, gau.v_proj.bias))
    q = z * gau.qk_scale[0] + gau.qk_offset[0]
    k = z * gau.qk_scale[1] + gau.qk_offset[1]
    if gau.position == "rotary":
        q = rotary_reference(q, positions, gau.rope_base)
        k = rotary_reference(k, positions, gau.rope_base)
    a = dense_attention_reference(gau, q, k, v, positions, valid)
    return F.linear(a * r, gau.out_proj.weight, gau.out_proj.bias)
