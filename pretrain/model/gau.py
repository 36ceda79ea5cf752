"""Single-head Gated Attention Unit with causal local attention over compressed tokens.

Token i of the compressed sequence attends to itself and the previous ``window`` activated
tokens (the SeqBoat paper, arXiv:2306.11197). Queries are processed in blocks of ``window``;
each block's keys are that block and the one before it, so the score tensor is
[B, M/w, w, 2w]: linear in the sequence length, never [M, M]. Softmax attention without a
learned positional bias runs through ``scaled_dot_product_attention`` (fused kernels: the
scores are not kept for backward); ``relu2``, the positional biases and attention dropout
build the scores explicitly.
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
    ) -> None:
        super().__init__()
        self.tp = tp
        self.cp = cp
        # The fused attention kernel where it applies (``uses_fused_kernel``); False: always
        # the reference path that builds the score blocks (for tests and benchmarks).
        self.fused = True
        self.zdim, self.hdim, self.window = zdim, hdim, window
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
        # here makes it whole (M x Z, smaller than the [M, 2w] attention weights).
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
        # from the ranks before it, prepended as one block (its queries are discarded).
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
        ``window`` queries of one sequence with its keys); under a dispatching context
        group, the windows with a query that matters are balanced over its ranks."""
        length, batch = q.shape[:2]
        windows = Windows.cut(
            q, k, v, positions, valid, valid if query_valid is None else query_valid, self.window
        )
        if self.cp.dispatch_group() is None:
            out, stats = self.attend(windows, collect_stats)
        else:
            out, stats = self._attend_dispatched(windows, collect_stats)
        return windows.join(out, length, batch), stats

    def _attend_dispatched(
        self, windows: Windows, collect_stats: bool
    ) -> tuple[Tensor, SpanStats | None]:
        busy = torch.nonzero(windows.valid_q.any(1)).squeeze(1)
        plan = Dispatch(int(busy.numel()), self.cp.dispatch_group())
        local = windows.select(busy)
        floats, ints = local.pack()
        remote = Windows.unpack(plan.send(floats), plan.send(ints), self.window, local.q.shape[-1])
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
        """Attention within each window: [I, window, H] outputs."""
        window = self.window
        # Query a of a window sits at a + window in its key axis: distance in activated tokens.
        offs = torch.arange(window, device=w.q.device)
        act_distance = (offs.unsqueeze(1) + window) - torch.arange(2 * window, device=w.q.device)
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
    """Independent pieces of causal local attention: item i is one block of ``window``
    compressed queries of one sequence with the ``2 * window`` keys it may see (the previous
    block and its own). Shapes: q [I, w, Z], k [I, 2w, Z], v [I, 2w, H], pos_q [I, w],
    pos_k [I, 2w], valid_k [I, 2w], valid_q [I, w]."""

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
        query_valid: Tensor, window: int,
    ) -> Windows:  # fmt: skip
        """From compressed [M, B, ...] tensors; items ordered by (sequence, block)."""
        length = q.shape[0]
        blocks = -(-length // window)
        pad = blocks * window - length

        def to_blocks(x: Tensor) -> Tensor:  # [M, B, ...] -> [B, n, w, ...]
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, 0, 0, pad)) if pad else x
            return x.view(blocks, window, *x.shape[1:]).movedim(2, 0)

        def with_previous(x: Tensor) -> Tensor:  # [B, n, w, ...] -> [B, n, 2w, ...]
            prev = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 1, 0))[:, :-1]
            return torch.cat([prev, x], dim=2)

        def items(x: Tensor) -> Tensor:  # [B, n, ...] -> [B * n, ...]
            return x.flatten(0, 1)

        pos_q = to_blocks(positions)
        return cls(
            q=items(to_blocks(q)),
            k=items(with_previous(to_blocks(k))),
            v=items(with_previous(to_blocks(v))),
            pos_q=items(pos_q),
            pos_k=items(with_previous(pos_q)),
            # Padding and the block before the first are invalid keys.
            valid_k=items(with_previous(to_blocks(valid))),
            valid_q=items(to_blocks(query_valid)),
        )

    def pos_distance(self) -> Tensor:
        """Original position of each query minus that of each key: [I, w, 2w]."""
        return self.pos_q.unsqueeze(-1) - self.pos_k.unsqueeze(-2)

    def join(self, out: Tensor, length: int, batch: int) -> Tensor:
        """Item outputs [B * n, w, H] -> compressed [M, B, H]."""
        blocks, window = out.shape[0] // batch, out.shape[1]
        out = out.view(batch, blocks, window, *out.shape[2:]).movedim(0, 2)
        return out.reshape(blocks * window, batch, *out.shape[3:])[:length]

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
    def unpack(cls, floats: Tensor, ints: Tensor, window: int, zdim: int) -> Windows:
        items = floats.shape[0]
        q, k, v = floats.split(
            [window * zdim, 2 * window * zdim, floats.shape[1] - 3 * window * zdim], 1
        )
        pos_q, pos_k, valid_k, valid_q = ints.split([window, 2 * window, 2 * window, window], 1)
        return cls(
            q=q.view(items, window, zdim),
            k=k.view(items, 2 * window, zdim),
            v=v.view(items, 2 * window, -1),
            pos_q=pos_q,
            pos_k=pos_k,
            valid_k=valid_k.bool(),
            valid_q=valid_q.bool(),
        )
