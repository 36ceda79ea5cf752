"""Single-head Gated Attention Unit with causal local attention over compressed tokens.

Token i of the compressed sequence attends to itself and the previous ``window`` activated
tokens (the SeqBoat paper, arXiv:2306.11197). Queries are processed in blocks of ``block``
(at most ``window``); each block's keys are the ``window`` tokens before it and its own, so
the score tensor is [B, M/b, b, w + b]: linear in the sequence length, never [M, M]. Blocks
smaller than the window compute fewer scores that the causal window masks (a query sees
w + 1 of its block's w + b keys; with b = w half of the 2w scores are masked) and pad less at
the end of a sequence. Softmax attention without a learned positional bias runs through
``scaled_dot_product_attention`` (fused kernels: the scores are not kept for backward);
``relu2``, the positional biases and attention dropout build the scores explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.context import ContextParallel
from parallel.dispatch import Dispatch
from parallel.halo import gather_halo, with_halo
from parallel.layout import mark_partial_grad, mark_replicated, mark_tensor_parallel
from parallel.tensor import SplitDropout, TensorParallel, column_linear, copy_to_group, row_linear
from pretrain.model.init import constant, init_linear_, initialize_, reset_, trunc_normal
from pretrain.model.rope import apply_rotary


@dataclass
class SpanStats:
    """Sum over attended (query, key) pairs of the original-position distance, and the count."""

    distance_sum: Tensor
    pairs: Tensor
    # Attention work max/mean over the dispatch group's ranks, before and after dispatch.
    imbalance: tuple[float, float] | None = None

    @staticmethod
    def total(parts: list[SpanStats]) -> SpanStats:
        return SpanStats(
            distance_sum=sum(p.distance_sum for p in parts), pairs=sum(p.pairs for p in parts)
        )


def query_block(window: int, block: int = 0) -> int:
    """Queries per block of the local attention: ``block`` (0: half the window), at most the
    window."""
    return min(block or max(1, window // 2), window)


class GatedAttentionUnit(nn.Module):
    def __init__(
        self,
        width: int,
        zdim: int,
        hdim: int,
        window: int,
        attention_fn: str = "softmax",
        position: str = "rotary",
        max_positions: int = 2048,
        rope_base: float = 10000.0,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        tp: TensorParallel = TensorParallel(),
        cp: ContextParallel = ContextParallel(),
        block: int = 0,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.cp = cp
        # The fused attention kernel where it applies (``uses_fused_kernel``); False: always
        # the reference path that builds the score blocks (for tests and benchmarks).
        self.fused = True
        self.zdim, self.hdim, self.window = zdim, hdim, window
        self.block = query_block(window, block)
        self.attention_fn, self.position = attention_fn, position
        self.rope_base = rope_base
        # z (shared query/key) is small and replicated under tensor parallelism: single-head
        # scores are computed redundantly on every rank. r and v are column-parallel over H,
        # the output projection row-parallel (its all-reduce returns the whole [M, B, D]).
        self.z_proj = nn.Linear(width, zdim)
        self.r_proj = column_linear(width, hdim, tp)
        self.v_proj = column_linear(width, hdim, tp)
        self.out_proj = row_linear(hdim, width, tp)
        self.qk_scale = nn.Parameter(torch.empty(2, zdim))
        self.qk_offset = nn.Parameter(torch.empty(2, zdim))
        if position == "simple":  # learned bias over the original-position distance
            self.rel_bias = nn.Parameter(torch.empty(max_positions))
        elif position == "local":  # learned bias over the distance in activated tokens
            self.rel_bias = nn.Parameter(torch.empty(window + 1))
        else:
            self.register_parameter("rel_bias", None)
        self.attention_dropout = nn.Dropout(attention_dropout)  # replicated weights
        self.hidden_dropout = SplitDropout(hidden_dropout, split=tp.active)  # v is split over H
        for p in (*self.z_proj.parameters(), self.qk_scale, self.qk_offset, self.out_proj.bias):
            mark_replicated(p)
        # Between the attention weights and z, gradients are per-rank partial sums.
        for p in (self.qk_scale, self.qk_offset, self.rel_bias):
            if p is not None:
                mark_replicated(p)
                mark_partial_grad(p)
        for lin in (self.r_proj, self.v_proj):
            mark_tensor_parallel(lin.weight, dim=0)
            mark_tensor_parallel(lin.bias, dim=0)
        mark_tensor_parallel(self.out_proj.weight, dim=1)
        for lin in (self.z_proj, self.r_proj, self.v_proj, self.out_proj):
            init_linear_(lin)
        initialize_(self.qk_scale, trunc_normal(0.02))
        initialize_(self.qk_offset, constant(0.0))
        if self.rel_bias is not None:
            initialize_(self.rel_bias, trunc_normal(0.02))

    def reset_parameters(self) -> None:
        reset_(self)

    def project(self, m: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """m: [..., D], positions: [...] original positions -> q, k [..., Z]; v, r [..., H]."""
        # Under tensor parallelism z is replicated but its gradient is not: each rank's part
        # of the attention gradient comes from its H-slice of v. The backward all-reduce
        # here makes it whole (M x Z, smaller than the [M, w + b] attention weights).
        z = copy_to_group(F.silu(self.z_proj(m)), self.tp)
        r = F.silu(self.r_proj(m))
        v = self.hidden_dropout(F.silu(self.v_proj(m)))
        q = z * self.qk_scale[0] + self.qk_offset[0]
        k = z * self.qk_scale[1] + self.qk_offset[1]
        if self.position == "rotary":
            q = apply_rotary(q, positions, self.rope_base)
            k = apply_rotary(k, positions, self.rope_base)
        return q, k, v, r

    def attention_weights(
        self, scores: Tensor, allowed: Tensor, pos_distance: Tensor, act_distance: Tensor
    ) -> Tensor:
        """Scaled scores [..., Q, K] -> attention weights, with the positional bias and mask.

        ``pos_distance`` = original position of query - of key; ``act_distance`` = the same
        in activated-token (compressed) indices, in [0, window] wherever ``allowed``.
        """
        if self.position == "simple":
            scores = scores + self.rel_bias[pos_distance.clamp(0, self.rel_bias.numel() - 1)]
        elif self.position == "local":
            scores = scores + self.rel_bias[act_distance.clamp(0, self.window)]
        if self.attention_fn == "softmax":
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1)
        else:  # relu2: masked entries are zeroed before the activation
            weights = F.relu(scores.masked_fill(~allowed, 0.0)) ** 2
        return self.attention_dropout(weights)

    def scale(self) -> float:
        return self.zdim**-0.5 if self.attention_fn == "softmax" else 1.0 / self.window

    def forward(
        self, m: Tensor, positions: Tensor, valid: Tensor, collect_stats: bool = False
    ) -> tuple[Tensor, SpanStats | None]:
        """m: [M, B, D] compressed tokens; positions: [M, B] long original positions;
        valid: [M, B] bool (empty slots are never attended). Returns ([M, B, D], stats)."""
        q, k, v, r = self.project(m, positions)
        if not self.cp.active:
            attn, stats = self.local_attention(q, k, v, positions, valid, collect_stats)
            return self.out_proj(attn * r), stats
        # Context parallel: the last `window` activated tokens before this rank's chunk come
        # from the ranks before it, prepended (their queries are discarded).
        (k_halo, v_halo, pos_halo), valid_halo = gather_halo(
            [k, v, positions], valid.sum(0), self.window, self.cp.group()
        )
        no_query = torch.zeros_like(valid_halo)
        attn, stats = self.local_attention(
            with_halo(q, torch.zeros_like(k_halo)), with_halo(k, k_halo), with_halo(v, v_halo),
            with_halo(positions, pos_halo), with_halo(valid, valid_halo), collect_stats,
            query_valid=with_halo(valid, no_query),
        )  # fmt: skip
        return self.out_proj(attn[self.window :] * r), stats

    def local_attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        positions: Tensor,
        valid: Tensor,
        collect_stats: bool = False,
        query_valid: Tensor | None = None,
    ) -> tuple[Tensor, SpanStats | None]:
        """Causal attention of each token to itself and the previous ``window`` tokens.

        ``valid`` marks the slots that may be attended; ``query_valid`` (default: the same)
        the queries whose output matters. The work is cut into windows (one block of
        ``block`` queries of one sequence with its keys), one sequence at a time, where the
        keys are views of the sequence; under a dispatching context group, the windows of
        all sequences with a query that matters are balanced over its ranks."""
        sequences = Windows.cut(
            q, k, v, positions, valid, valid if query_valid is None else query_valid,
            self.window, self.block,
        )  # fmt: skip
        if self.cp.dispatch_group() is None:
            attended = [self.attend(windows, collect_stats) for windows in sequences]
            outs = [out for out, _ in attended]
            parts = [s for _, s in attended if s is not None]
            stats = SpanStats.total(parts) if collect_stats else None
        else:
            out, stats = self._attend_dispatched(Windows.concat(sequences), collect_stats)
            outs = list(out.chunk(len(sequences)))
        return Windows.join(outs, q.shape[0]), stats

    def _attend_dispatched(
        self, windows: Windows, collect_stats: bool
    ) -> tuple[Tensor, SpanStats | None]:
        busy = torch.nonzero(windows.valid_q.any(1)).squeeze(1)
        plan = Dispatch(int(busy.numel()), self.cp.dispatch_group())
        local = windows.select(busy)
        floats, ints = local.pack()
        remote = Windows.unpack(
            plan.send(floats), plan.send(ints), self.block, self.window, local.q.shape[-1]
        )
        out, stats = self.attend(remote, collect_stats)
        if stats is not None:
            stats.imbalance = (plan.before, plan.after)
        out = plan.gather(out)
        full = out.new_zeros(windows.q.shape[0], *out.shape[1:])
        return full.index_copy(0, busy, out), stats

    def uses_fused_kernel(self) -> bool:
        """Softmax attention without a learned positional bias and without attention dropout
        (its masks come from another RNG pattern) goes through PyTorch's fused kernel."""
        no_dropout = self.attention_dropout.p == 0 or not self.training
        plain = self.attention_fn == "softmax" and self.position in ("rotary", "none")
        return self.fused and plain and no_dropout

    def attend(self, w: Windows, collect_stats: bool = False) -> tuple[Tensor, SpanStats | None]:
        """Attention within each window: [I, block, H] outputs."""
        window, block = self.window, w.q.shape[1]
        # Query a of a window sits at a + window in its key axis: distance in activated tokens.
        offs = torch.arange(block, device=w.q.device)
        keys = torch.arange(window + block, device=w.q.device)
        act_distance = (offs.unsqueeze(1) + window) - keys
        allowed = ((act_distance >= 0) & (act_distance <= window)) & w.valid_k.unsqueeze(1)
        if self.uses_fused_kernel():
            # The score blocks are never kept for backward. Each query may also see its own
            # slot, so that no row is empty (an empty slot's query, whose output is
            # discarded; kernels differ in what an empty row gives): a valid query's own key
            # is allowed anyway.
            mask = (allowed | (act_distance == 0)).unsqueeze(1)
            # One head: fused kernels take [items, heads, length, dim]. PyTorch's flash
            # kernels need the value width H equal to the query width Z; where it is not
            # (the GAU's H > Z), the memory-efficient kernel (CUDA) or the math path runs.
            q, k, v = (t.unsqueeze(1) for t in (w.q, w.k, w.v))
            out = F.scaled_dot_product_attention(q, k, v, mask, scale=self.scale()).squeeze(1)
        else:
            scores = torch.matmul(w.q, w.k.transpose(-1, -2)) * self.scale()
            weights = self.attention_weights(scores, allowed, w.pos_distance(), act_distance)
            out = torch.matmul(weights.to(w.v.dtype), w.v)
        stats = None
        if collect_stats:
            with torch.no_grad():
                attended = allowed & w.valid_q.unsqueeze(-1)
                stats = SpanStats(
                    distance_sum=(w.pos_distance() * attended).sum().to(torch.float64),
                    pairs=attended.sum(),
                )
        return out, stats


@dataclass
class Windows:
    """Independent pieces of causal local attention: item i is one block of ``b`` compressed
    queries of one sequence with the ``w + b`` keys it may see (the ``w`` tokens before the
    block and its own). Shapes: q [I, b, Z], k [I, w+b, Z], v [I, w+b, H], pos_q [I, b],
    pos_k [I, w+b], valid_k [I, w+b], valid_q [I, b]."""

    q: Tensor
    k: Tensor
    v: Tensor
    pos_q: Tensor
    pos_k: Tensor
    valid_k: Tensor
    valid_q: Tensor

    @classmethod
    def cut(
        cls, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor,
        query_valid: Tensor, window: int, block: int,
    ) -> list[Windows]:  # fmt: skip
        """From compressed [M, B, ...] tensors: the windows of each sequence, ordered by
        block. The keys and values of a sequence's windows are overlapping views of the
        sequence (behind ``window`` zero slots), not copies: the ``w + b`` keys of a window
        would otherwise hold each key (w + b) / b times."""
        length, batch = q.shape[:2]
        blocks = -(-length // block)
        pad = blocks * block - length

        def padded(x: Tensor, before: int) -> Tensor:  # ``before`` and ``pad`` zero slots
            return F.pad(x, (0, 0) * (x.dim() - 2) + (0, 0, before, pad))

        def to_blocks(x: Tensor) -> list[Tensor]:  # [M, B, ...] -> B x [n, b, ...]
            x = padded(x, 0) if pad else x
            return list(x.view(blocks, block, *x.shape[1:]).unbind(2))

        def with_previous(x: Tensor) -> list[Tensor]:  # [M, B, ...] -> B x [n, w + b, ...]
            # Block j's keys are padded slots j b .. j b + w + b - 1: a sliding window over
            # the token axis (unfold puts the window's axis last).
            x = padded(x, window).unfold(0, window + block, block)  # [n, B, ..., w + b]
            return list(x.movedim(-1, 1).unbind(2))

        fields = (
            to_blocks(q), with_previous(k), with_previous(v), to_blocks(positions),
            with_previous(positions),
            # Padding and the slots before the first token are invalid keys.
            with_previous(valid), to_blocks(query_valid),
        )  # fmt: skip
        return [cls(*(f[b] for f in fields)) for b in range(batch)]

    @classmethod
    def concat(cls, parts: list[Windows]) -> Windows:
        """The windows of ``parts``, in order, as one (copied) set."""
        return cls(*(torch.cat(f) for f in zip(*(p._fields() for p in parts), strict=True)))

    def pos_distance(self) -> Tensor:
        """Original position of each query minus that of each key: [I, b, w + b]."""
        return self.pos_q.unsqueeze(-1) - self.pos_k.unsqueeze(-2)

    @staticmethod
    def join(outs: list[Tensor], length: int) -> Tensor:
        """Each sequence's window outputs [n, b, H] -> compressed [M, B, H]."""
        out = torch.stack(outs, dim=2)  # [n, b, B, H]
        return out.flatten(0, 1)[:length]

    def select(self, index: Tensor) -> Windows:
        return Windows(*(t.index_select(0, index) for t in self._fields()))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.q, self.k, self.v, self.pos_q, self.pos_k, self.valid_k, self.valid_q)

    def pack(self) -> tuple[Tensor, Tensor]:
        """Two row tensors to ship: [I, ...] floats (q, k, v) and integers (the rest)."""
        floats = torch.cat([self.q.flatten(1), self.k.flatten(1), self.v.flatten(1)], 1)
        ints = torch.cat([self.pos_q, self.pos_k, self.valid_k.long(), self.valid_q.long()], 1)
        return floats, ints

    @classmethod
    def unpack(cls, floats: Tensor, ints: Tensor, block: int, window: int, zdim: int) -> Windows:
        items, keys = floats.shape[0], window + block
        q, k, v = floats.split(
            [block * zdim, keys * zdim, floats.shape[1] - (block + keys) * zdim], 1
        )
        pos_q, pos_k, valid_k, valid_q = ints.split([block, keys, keys, block], 1)
        return cls(
            q=q.view(items, block, zdim),
            k=k.view(items, keys, zdim),
            v=v.view(items, keys, -1),
            pos_q=pos_q,
            pos_k=pos_k,
            valid_k=valid_k.bool(),
            valid_q=valid_q.bool(),
        )
