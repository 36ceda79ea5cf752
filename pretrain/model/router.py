"""Sparse Modular Activation: the latent configurator (router) and compress / extract.

The router reads two logits per token (skip, activate) and returns a hard decision and a
differentiable gate (the SeqBoat paper, arXiv:2306.11197). Compress packs the activated
tokens of each sequence to the front of a shorter buffer; extract scatters results back.
Everything is sequence-major: a token axis first, then the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from parallel.layout import mark_replicated
from pretrain.model.init import constant, initialize_


class Router(nn.Module):
    """Tempered softmax over (skip, activate) with a learned scalar temperature."""

    def __init__(self, width: int, init_temp_scale: float = 1.0, act_bias: float = 0.0) -> None:
        super().__init__()
        self.act_bias = act_bias
        self.init_log_temp = math.log(init_temp_scale * math.sqrt(width))
        self.log_temp = nn.Parameter(torch.full((), self.init_log_temp))
        mark_replicated(self.log_temp)
        initialize_(self.log_temp, constant(self.init_log_temp))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.log_temp.fill_(self.init_log_temp)

    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """logits: [..., 2] -> (activated bool [...], gate [...] in logits' dtype).

        The decision is the argmax, which the temperature cannot change; the gate is the
        probability of "activate" on activated tokens and 0 elsewhere. The gate is the only
        path by which the router gets gradient (no straight-through estimator).
        """
        u = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        skip = u[..., 0] + self.act_bias
        # argmax with ties going to "skip", exactly as torch.argmax over (skip, activate).
        activated = u[..., 1] > skip
        prob = torch.softmax(torch.stack([skip, u[..., 1]], -1) / self.log_temp.exp(), dim=-1)
        gate = torch.where(activated, prob[..., 1], torch.zeros_like(prob[..., 1]))
        return activated, gate.to(logits.dtype)


@dataclass
class Compression:
    """Where the activated tokens of each sequence went.

    ``index[j, b]`` is the original position of the j-th activated token of sequence b
    (``valid[j, b]`` False past the sequence's count, index then 0); ``slot[t, b]`` is the
    compressed slot of token t, meaningful where ``activated[t, b]``.
    """

    index: Tensor  # [M, B] long
    valid: Tensor  # [M, B] bool
    slot: Tensor  # [L, B] long
    activated: Tensor  # [L, B] bool
    counts: Tensor  # [B] long

    @property
    def length(self) -> int:
        return self.index.shape[0]


def plan_compression(activated: Tensor) -> Compression:
    """activated: [L, B] bool. M is the largest activated count in the batch (at least 1,
    so that a batch with no activated token still has a well-formed, all-invalid slot)."""
    counts = activated.sum(0)
    m = max(int(counts.max()), 1)
    # A stable sort puts the activated positions first, in time order.
    order = torch.argsort((~activated).to(torch.int8), dim=0, stable=True)[:m]
    valid = torch.arange(m, device=activated.device).unsqueeze(1) < counts.unsqueeze(0)
    index = torch.where(valid, order, torch.zeros_like(order))
    slot = (torch.cumsum(activated.long(), 0) - 1).clamp_min(0)
    return Compression(index=index, valid=valid, slot=slot, activated=activated, counts=counts)


def compress(x: Tensor, plan: Compression) -> Tensor:
    """x: [L, B, ...] -> [M, B, ...]; zeros in the empty slots."""
    out = _take_rows(x, plan.index)
    mask = plan.valid.view(*plan.valid.shape, *([1] * (x.dim() - 2)))
    return out * mask.to(out.dtype) if out.is_floating_point() else out * mask


def extract(y: Tensor, plan: Compression) -> Tensor:
    """y: [M, B, ...] -> [L, B, ...]; activated tokens get their slot, skipped ones exact 0."""
    out = _take_rows(y, plan.slot)
    mask = plan.activated.view(*plan.activated.shape, *([1] * (y.dim() - 2)))
    return out * mask.to(out.dtype)


def _take_rows(x: Tensor, index: Tensor) -> Tensor:
    """out[i, b] = x[index[i, b], b]. Row-wise index_select on the flattened [T*B, ...]
    view: its backward is a row-wise index_add, far cheaper than gather's scatter_add."""
    batch = x.shape[1]
    flat = (index * batch + torch.arange(batch, device=x.device)).reshape(-1)
    rows = x.reshape(x.shape[0] * batch, *x.shape[2:]).index_select(0, flat)
    return rows.view(*index.shape, *x.shape[2:])
