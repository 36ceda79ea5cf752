"""One SeqBoat layer (causal), as in the SeqBoat paper (arXiv:2306.11197):

    xn = norm(x)                          (pre-norm; post-norm normalises the output instead)
    m  = dropout(silu(EMA(xn)))
    [u ; hx] = W m + b                    (u: 2 routing logits)
    activated, gate = router(u)
    o  = extract(GAU(compress(m))) * gate
    y  = silu(x + dropout(hx + o))

The GAU always runs on the compressed sequence, even when some sequence activates every
token: the reference's uncompressed fallback is a data-dependent branch (different ranks
would take different paths) and changes the window's meaning, so it is not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.context import ContextParallel
from parallel.layout import mark_replicated, mark_sequence_parallel, mark_tensor_parallel
from parallel.scan import context_parallel_ema
from parallel.tensor import (
    SplitDropout,
    TensorParallel,
    broadcast_decision,
    column_linear,
    enter_channel_split,
    gather_channels,
    gather_sequence,
    row_linear,
    scatter_sequence,
)
from pretrain.config import ModelConfig
from pretrain.model.ema import DampedEMA
from pretrain.model.gau import GatedAttentionUnit, SpanStats
from pretrain.model.init import init_linear_
from pretrain.model.norm import make_norm
from pretrain.model.recompute import RecordedPass, checkpoint, same_routing
from pretrain.model.router import Router, compress, extract, plan_compression


@dataclass
class LayerStats:
    """Routing statistics of one layer for one forward pass (no gradient)."""

    activated: Tensor  # [L, B] bool
    span_sum: Tensor  # sum of original-position distances over attended pairs
    span_pairs: Tensor  # number of attended pairs
    imbalance: tuple[float, float] | None = None  # attention work max/mean: before, after


class FeedForward(nn.Module):
    """Optional FFN (no released config uses one): fc1 -> silu -> dropout -> fc2 -> dropout.
    Megatron's MLP split: fc1 column-parallel, fc2 row-parallel."""

    def __init__(self, width: int, hidden: int, dropout: float, tp: TensorParallel) -> None:
        super().__init__()
        sp = tp.sequence_parallel
        self.fc1 = init_linear_(column_linear(width, hidden, tp, sequence_parallel=sp))
        self.fc2 = init_linear_(row_linear(hidden, width, tp, sequence_parallel=sp))
        self.hidden_dropout = SplitDropout(dropout, split=tp.active)
        self.dropout = SplitDropout(dropout, split=sp)
        mark_tensor_parallel(self.fc1.weight, dim=0)
        mark_tensor_parallel(self.fc1.bias, dim=0)
        mark_tensor_parallel(self.fc2.weight, dim=1)
        mark_replicated(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.hidden_dropout(F.silu(self.fc1(x)))))


class SeqBoatLayer(nn.Module):
    """Under tensor parallelism (``tp``) the EMA runs on this rank's D/tp channels of the
    whole sequence; with sequence parallelism the residual stream, norms and dropout hold
    L/tp tokens. See parallel/tensor.py for the regions."""

    # Activation recompute in training: "none", "gau" (the attention part) or "layer" (the
    # whole layer from its input); set by pretrain/model/recompute.py ``set_recompute``.
    recompute: str = "none"

    def __init__(
        self,
        cfg: ModelConfig,
        tp: TensorParallel = TensorParallel(),
        cp: ContextParallel = ContextParallel(),
    ) -> None:
        super().__init__()
        self.tp = tp
        self.cp = cp
        d = cfg.width
        self.prenorm = cfg.prenorm
        self.routing = cfg.routing
        self.norm = make_norm(cfg.norm, d)
        self.ema = DampedEMA(
            tp.local(d, "model.width"), cfg.ndim, cfg.ema_truncation, cfg.ema_chunk
        )
        # Row-parallel on the channel-split EMA output: every tensor-parallel rank ends up
        # with the same two routing logits and takes the same decision.
        self.hx_proj = init_linear_(
            row_linear(
                d, d + 2 if cfg.routing == "sparse" else d, tp,
                sequence_parallel=tp.sequence_parallel,
            )
        )  # fmt: skip
        mark_tensor_parallel(self.hx_proj.weight, dim=1)
        mark_replicated(self.hx_proj.bias)
        self.router = (
            Router(d, cfg.init_temp_scale, cfg.act_bias) if cfg.routing == "sparse" else None
        )
        self.gau = (
            None
            if cfg.routing == "never"
            else GatedAttentionUnit(
                d,
                cfg.zdim,
                cfg.hdim,
                cfg.window,
                cfg.attention_fn,
                cfg.position,
                cfg.max_positions,
                cfg.rope_base,
                cfg.attention_dropout,
                cfg.hidden_dropout,
                tp,
                self.cp,
                cfg.attention_block,
            )
        )
        self.ema_dropout = SplitDropout(cfg.dropout, split=tp.active)  # channel-split
        # The residual stream is replicated, or sequence-split under sequence parallelism.
        self.dropout = SplitDropout(cfg.dropout, split=tp.sequence_parallel)
        self.ffn = FeedForward(d, cfg.ffn_hidden, cfg.dropout, tp) if cfg.ffn_hidden else None
        self.ffn_norm = make_norm(cfg.norm, d) if cfg.ffn_hidden else None
        if tp.sequence_parallel:
            for norm in (self.norm, self.ffn_norm):
                if norm is not None:
                    mark_sequence_parallel(norm)

    def route(self, hx_and_logits: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Splits the projection into (hx, activated [L, B] or None, gate [L, B] or None).

        The decision and gate cover the whole sequence on every rank: under sequence
        parallelism the [L/tp, B, 2] logits are gathered (the gate's gradient is already
        whole on every rank, so the backward keeps this rank's part instead of summing)."""
        if self.router is None:
            return hx_and_logits, None, None
        logits = hx_and_logits[..., :2]
        if self.tp.sequence_parallel:
            logits = gather_sequence(logits, self.tp, complete_grad=True)
        activated, gate = self.router(logits)
        return hx_and_logits[..., 2:], broadcast_decision(activated, self.tp), gate

    def forward(self, x: Tensor, collect_stats: bool = False) -> tuple[Tensor, LayerStats | None]:
        """x: [L, B, D] ([L/tp, B, D] under sequence parallelism) -> (same shape, stats)."""
        if self.recompute != "layer" or not torch.is_grad_enabled():
            return self._forward(x, collect_stats)
        record = RecordedPass()

        def run(x: Tensor) -> Tensor:
            y, stats = self._forward(x, collect_stats and record.first, record)
            if record.first:  # statistics from the forward only, never from the recompute
                record.stats, record.first = stats, False
            return y

        return checkpoint(run, x), record.stats

    def _forward(
        self, x: Tensor, collect_stats: bool, record: RecordedPass | None = None
    ) -> tuple[Tensor, LayerStats | None]:
        """The layer; ``record`` (whole-layer recompute): the first pass records its routing
        decision there, the recompute takes it."""
        h = self.norm(x) if self.prenorm else x
        h = enter_channel_split(h, self.tp)  # [L, B, D/tp]
        length, batch = h.shape[:2]
        # Context parallel: this rank's chunk, continued from the states of the ones before.
        ema = context_parallel_ema(self.ema, h, self.cp.group()) if self.cp.active else self.ema(h)
        m = self.ema_dropout(F.silu(ema))
        hx, activated, gate = self.route(self.hx_proj(m))
        if record is not None and activated is not None:
            if record.first:
                record.activated = activated
            else:
                activated = same_routing(activated, record.activated)
        stats = None
        if self.gau is None:
            o = torch.zeros_like(hx)
            activated = torch.zeros(length, batch, dtype=torch.bool, device=x.device)
            span = (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long))
        else:
            if activated is None:  # "always": every token, ungated
                activated = torch.ones(length, batch, dtype=torch.bool, device=x.device)
            o, span_stats = self._attention(m, activated, gate, collect_stats)
            span = (
                (span_stats.distance_sum, span_stats.pairs, span_stats.imbalance)
                if span_stats
                else None
            )
        if collect_stats:
            stats = LayerStats(activated.detach(), *span)
        y = F.silu(x + self.dropout(hx + o))
        if not self.prenorm:
            y = self.norm(y)
        if self.ffn is not None:
            y = self._ffn_block(y)
        return y, stats

    def _attention(
        self, m: Tensor, activated: Tensor, gate: Tensor | None, collect_stats: bool
    ) -> tuple[Tensor, SpanStats | None]:
        """The GAU on the activated tokens, gated, back in the residual's layout; with
        selective recompute (``gau``) only its inputs are kept for backward."""
        if self.recompute != "gau" or not torch.is_grad_enabled():
            return self._attend(m, activated, gate, collect_stats)
        record = RecordedPass()

        def run(m: Tensor, activated: Tensor, gate: Tensor | None) -> Tensor:
            o, span_stats = self._attend(m, activated, gate, collect_stats and record.first)
            if record.first:
                record.stats, record.first = span_stats, False
            return o

        # ``activated`` is saved with the inputs: the recompute routes exactly the same tokens.
        return checkpoint(run, m, activated, gate), record.stats

    def _attend(
        self, m: Tensor, activated: Tensor, gate: Tensor | None, collect_stats: bool
    ) -> tuple[Tensor, SpanStats | None]:
        length, batch = activated.shape
        plan = plan_compression(activated)
        positions = self.cp.positions(length, m.device).unsqueeze(1).expand(-1, batch)
        # Only the activated tokens' channels cross the group: M x D, not L x D.
        mc = gather_channels(compress(m, plan), self.tp)
        oc, span_stats = self.gau(mc, compress(positions, plan), plan.valid, collect_stats)
        o = extract(oc, plan)
        if gate is not None:
            o = o * gate.unsqueeze(-1)
        return scatter_sequence(o, self.tp), span_stats

    def _ffn_block(self, y: Tensor) -> Tensor:
        if self.prenorm:
            return y + self.ffn(self.ffn_norm(y))
        return self.ffn_norm(y + self.ffn(y))
