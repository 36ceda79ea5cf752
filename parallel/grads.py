"""Gradient synchronization and clipping after the backward pass, in one place.

After backward, every rank holds gradients that are not yet those of the global mean loss:

1. ``sync_tied_grads``: a weight tied between the first and the last pipeline stage (the
   embedding and the head's copy) is summed over megatron-core's embedding group;
2. ``sum_partial_grads``: weights whose gradient each tensor-parallel rank holds only part of
   (sequence-parallel norms, ``mark_partial_grad`` weights) are summed over the tensor group;
3. ``average_gradients``: every gradient is averaged over the ranks that see different tokens
   of the same model shard (data x context);
4. ``clip_gradients``: the whole model's norm (split parameters counted on every rank,
   replicated ones once, pipeline stages summed, a tied copy counted once), then scaling.

``finish_gradients`` runs the four in that order; under DeepSpeed ZeRO, DeepSpeed does 3 and 4
and ``parallel.zero`` hooks do 2. ``OverlappedGradReduce`` does most of 3 during the last
backward of a step instead of after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.comm import all_reduce_coalesced
from parallel.dims import ParallelDims
from parallel.layout import holds_partial_grad, is_split
from parallel.tensor import TensorParallel


def sum_partial_grads(model: nn.Module, tp: TensorParallel) -> None:
    """Sums, over the tensor group, the gradients each rank holds only part of: weights
    applied to sequence shards (norms, row biases; megatron-core's ``sequence_parallel``)
    and replicated weights on a split activation's gradient path (``partial_grad``)."""
    if not tp.active:
        return
    grads = [
        p.grad
        for p in model.parameters()
        if p.grad is not None and holds_partial_grad(p, tp.sequence_parallel)
    ]
    all_reduce_coalesced(grads, tp.group())


def sync_tied_grads(weights: Sequence[nn.Parameter], pipeline_active: bool) -> None:
    """Sums the gradients of a weight tied between the first and the last stage (the word
    embedding and its copy used by the head) over megatron-core's embedding group, so both
    copies step identically. ``weights``: this rank's copies (empty on middle stages, or
    everywhere when the head is untied). A no-op without a pipeline."""
    if not pipeline_active or not weights:
        return
    from megatron.core import parallel_state

    if not parallel_state.is_rank_in_embedding_group():
        raise ValueError("only the first and last pipeline stages hold a tied weight")
    grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
    all_reduce_coalesced(grads, parallel_state.get_embedding_group())
    for w, g in zip(weights, grads, strict=True):
        w.grad = g


def average_gradients(model: nn.Module, group: dist.ProcessGroup | None, size: int) -> None:
    """Mean of every gradient over the group (one coalesced all-reduce). Every rank's loss is
    a mean over the same number of tokens, so this is the gradient of the global mean."""
    if size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    all_reduce_coalesced(grads, group, scale=1.0 / size)


def average(value: Tensor, group: dist.ProcessGroup | None, size: int) -> Tensor:
    """The mean of a scalar tensor over the group."""
    if size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, group=group)
    return value / size


def grad_norm_squared(
    params: list[nn.Parameter],
    tp: TensorParallel,
    pipeline_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Sum of squared gradient entries over the whole (unsplit) model: split parameters
    count on every rank, replicated ones once; with ``pipeline_group``, summed over the
    stages too (``params`` then leaves out the copies a stage holds of another's weight)."""
    grads = [p.grad for p in params if p.grad is not None and (is_split(p) or tp.rank == 0)]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        total += g.detach().double().pow(2).sum()
    if tp.active:
        dist.all_reduce(total, group=tp.group())
    if pipeline_group is not None:
        dist.all_reduce(total, group=pipeline_group)
    return total


def clip_gradients(
    params: list[nn.Parameter],
    max_norm: float,
    tp: TensorParallel,
    pipeline_group: dist.ProcessGroup | None = None,
    uncounted: Sequence[nn.Parameter] = (),
) -> float:
    """Scales gradients so that the whole model's gradient norm is at most ``max_norm``
    (0 = no clipping); returns the norm before clipping (inf/nan if non-finite).

    Under pipeline parallelism pass the pipeline group, and in ``uncounted`` the copies of
    a weight another stage owns (a tied head's embedding on the last stage): they are
    scaled like the rest but counted once, by their owner."""
    skip = {id(p) for p in uncounted}
    counted = [p for p in params if id(p) not in skip]
    norm = float(grad_norm_squared(counted, tp, pipeline_group).sqrt())
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def finish_gradients(
    chunks: Sequence[nn.Module],
    dims: ParallelDims,
    max_norm: float,
    tied: Sequence[nn.Parameter] = (),
    overlapped: OverlappedGradReduce | None = None,
) -> float:
    """Steps 1-4 of the module docstring over this rank's model ``chunks`` (one per pipeline
    stage it runs); ``tied``: this rank's copies of the weight tied between the first and
    the last stage; ``overlapped``: the reducer that averaged (most of) the gradients during
    the backward. Returns the whole model's gradient norm before clipping."""
    tp = dims.tensor
    sync_tied_grads(tied, dims.pp_size > 1)
    for chunk in chunks:
        sum_partial_grads(chunk, tp)
    params = list({id(p): p for chunk in chunks for p in chunk.parameters()}.values())
    if overlapped is not None:
        overlapped.finish()
    if dims.replicas > 1:
        done = overlapped.params if overlapped is not None else set()
        grads = [p.grad for p in params if p.grad is not None and id(p) not in done]
        all_reduce_coalesced(grads, dims.dp_group(), scale=1.0 / dims.replicas)
    pipeline_group = dims.pp_group() if dims.pp_size > 1 else None
    # The last stage's copy of a tied weight is counted by its owner, the first stage.
    uncounted = tied if not dims.is_first_stage else ()
    return clip_gradients(params, max_norm, tp, pipeline_group, uncounted)


class OverlappedGradReduce:
    """Averages gradients over the data x context ranks in buckets while the last backward
    of a step still runs, instead of in one all-reduce after it (torch DDP's and
    megatron-core's ``overlap_grad_reduce``, for our loop).

    Parameters are bucketed in reverse order of registration (about the order backward
    produces their gradients), ``bucket_bytes`` per bucket. Only armed for the step's last
    micro-batch (``arm``): then each parameter's post-accumulate hook marks it ready, and
    the buckets are reduced asynchronously strictly in bucket order, so every rank issues
    the same collectives in the same order whatever its graph's timing. ``finish`` reduces
    what is left, waits, and writes back the mean.

    Weights whose gradient is a tensor-parallel partial sum (``holds_partial_grad``) are
    left out: they are summed over the tensor group first, then averaged with the rest at
    the end (``finish_gradients``), so every gradient is computed with the same additions
    as without overlap.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: dist.ProcessGroup,
        size: int,
        sequence_parallel: bool,
        bucket_bytes: int = 25 * 2**20,
    ) -> None:
        self.group, self.size = group, size
        chosen = [p for p in params if not holds_partial_grad(p, sequence_parallel)]
        self.buckets: list[list[nn.Parameter]] = []
        current: list[nn.Parameter] = []
        filled = 0
        for p in reversed(chosen):
            current.append(p)
            filled += p.numel() * p.element_size()
            if filled >= bucket_bytes:
                self.buckets.append(current)
                current, filled = [], 0
        if current:
            self.buckets.append(current)
        self.params = {id(p) for p in chosen}
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._armed = False
        self._ready: list[int] = []
        self._pending: list[tuple[Any, Tensor, list[nn.Parameter]]] = []
        self._next = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in chosen]

    def arm(self) -> None:
        """The next backward is the step's last: reduce as gradients become final."""
        self._armed = True
        self._ready = [0] * len(self.buckets)
        self._next = 0

    def _on_grad(self, param: nn.Parameter) -> None:
        if not self._armed:
            return
        self._ready[self._bucket_of[id(param)]] += 1
        while self._next < len(self.buckets) and self._complete(self._next):
            self._launch(self._next)
            self._next += 1

    def _complete(self, index: int) -> bool:
        return self._ready[index] == len(self.buckets[index])

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        # A parameter without a gradient this step (unused) enters as zeros, so that every
        # rank's buffer has the same layout; it gets no gradient back.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending.append((work, flat, bucket))

    def finish(self) -> None:
        """Reduces the buckets not launched yet, waits for all, writes back the means."""
        if not self._armed:
            raise RuntimeError("finish() without arm(): the gradients were not reduced")
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for work, flat, bucket in self._pending:
            work.wait()
            flat.mul_(1.0 / self.size)
            offset = 0
            for p in bucket:
                if p.grad is not None:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self._pending = []
        self._armed = False
