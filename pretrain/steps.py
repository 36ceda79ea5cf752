"""One training step, behind one interface: ``TrainStep(batch, collect_stats) -> StepResult``.

A step is two independent choices:

* how the gradients of the global batch's mean loss are produced: a loop of forward and
  backward over this rank's micro-batches (``MicroBatchLoop``), or megatron-core's pipeline
  schedule over them (``PipelineSchedule``);
* how they are applied (``Update``): our optimizer after ``parallel.grads.finish_gradients``
  (``OptimizerUpdate``), or DeepSpeed ZeRO, which reduces, clips and steps itself
  (``ZeroUpdate``; with a pipeline, ZeRO-1 only).

Either way a step whose loss or gradient norm is non-finite (or, with ``train.spike_guard``,
a spike: ``pretrain/spike_guard.py``) leaves the weights alone but consumes its batch and its
place in the learning-rate schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from parallel.dims import ParallelDims
from parallel.grads import OverlappedGradReduce, average, finish_gradients, sync_tied_grads
from parallel.pipeline import PipelinePlace, broadcast_loss, pipeline_step
from parallel.zero import ZeroEngine
from pretrain.build import overlapped_reduce_for
from pretrain.config import Config
from pretrain.layer_stats import ChunkStats, LayerSummary, summarize
from pretrain.model.lm import LanguageModel, stage_forward
from pretrain.precision import autocast_for
from pretrain.spike_guard import SpikeGuard


class StepResult(NamedTuple):
    loss: float  # the global batch's mean loss
    grad_norm: float  # before clipping; inf/nan for a skipped step
    stats: list[LayerSummary] | None  # per layer, over the run's whole global batch
    applied: bool = True  # False: the weights were left alone (non-finite, or a spike)
    spike: bool = False  # skipped by the spike guard


class Update(Protocol):
    def backward(self, loss: Tensor, micro_batches: int) -> None:
        """Backward of one micro-batch's mean ``loss`` (the loop's gradient accumulation)."""

    def apply(self, loss: float) -> tuple[float, bool, bool]:
        """Applies the accumulated gradients unless ``loss`` or the norm is non-finite or a
        spike, advances the schedule; returns (the gradient norm before clipping, applied,
        skipped as a spike)."""


class OptimizerUpdate:
    """Our torch optimizer: gradients finished by ``parallel.grads`` (tensor, tied, data x
    context, clipping), then the optimizer and the schedule."""

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        dims: ParallelDims,
        clip_grad: float,
        overlap: OverlappedGradReduce | None = None,
        guard: SpikeGuard | None = None,
    ) -> None:
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.dims, self.clip_grad, self.overlap, self.guard = dims, clip_grad, overlap, guard
        # This rank's copies of the weight tied between the first and the last stage.
        self.tied = [w for c in chunks for w in c.tied_weights()]
        self._backwards = 0  # of this step's micro-batches

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        self._backwards += 1
        if self.overlap is not None and self._backwards == micro_batches:
            self.overlap.arm()  # the gradients become final during this backward
        (loss / micro_batches).backward()

    def apply(self, loss: float) -> tuple[float, bool, bool]:
        self._backwards = 0
        norm = finish_gradients(
            self.chunks, self.dims, self.clip_grad, self.tied, overlapped=self.overlap
        )
        finite = math.isfinite(loss) and math.isfinite(norm)
        spike = finite and self.guard is not None and self.guard.is_spike(loss, norm)
        if finite and not spike:
            self.optimizer.step()
            if self.guard is not None:
                self.guard.record(loss, norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, finite and not spike, spike


class ZeroUpdate:
    """DeepSpeed ZeRO: reduction, clipping, the step (or its skip) and our schedule. A tied
    weight's pipeline copies are summed first (DeepSpeed knows nothing of the embedding
    group)."""

    def __init__(
        self,
        zero: ZeroEngine,
        chunks: Sequence[nn.Module],
        dims: ParallelDims,
        guard: SpikeGuard | None = None,
    ) -> None:
        self.zero, self.dims, self.guard = zero, dims, guard
        self.tied = [w for c in chunks for w in c.tied_weights()]

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        self.zero.backward(loss)  # divided by the accumulation steps inside

    def apply(self, loss: float) -> tuple[float, bool, bool]:
        sync_tied_grads(self.tied, self.dims.pp_size > 1)
        # DeepSpeed computes the norm inside its step: only the loss is checked for a spike.
        spike = self.guard is not None and math.isfinite(loss) and self.guard.is_spike(loss)
        result = self.zero.step(skip=spike or not math.isfinite(loss))
        if result.applied and self.guard is not None:
            self.guard.record(loss, result.grad_norm)
        return result.grad_norm, result.applied, spike


class MicroBatchLoop:
    """Forward and backward of each micro-batch in turn; their mean loss (this rank's)."""

    def __init__(
        self, model: LanguageModel, dims: ParallelDims, precision: str, compile: bool = False
    ) -> None:
        self.model, self.dims, self.precision = model, dims, precision
        # Dynamic shapes: the compressed length changes with the routing at every step.
        self.compiled = torch.compile(model.loss, dynamic=True) if compile else None

    def __call__(
        self, micro_batches: Sequence[Tensor], update: Update, collect_stats: bool
    ) -> tuple[Tensor, ChunkStats | None]:
        device, cp = self.dims.device, self.dims.context
        total = torch.zeros((), dtype=torch.float64, device=device)
        per_micro = []
        for micro in micro_batches:
            with autocast_for(self.precision, device):
                loss_fn = self.compiled or self.model.loss
                loss, micro_stats = loss_fn(cp.chunk(micro).to(device), collect_stats)
            update.backward(loss, len(micro_batches))
            total += loss.detach().double() / len(micro_batches)
            per_micro.append(micro_stats or [])
        return total, {0: per_micro} if collect_stats else None


class PipelineSchedule:
    """megatron-core's 1F1B (or interleaved) schedule over the micro-batches; their mean loss
    from the last stage, and this rank's chunks' layer statistics of every micro-batch."""

    def __init__(
        self,
        chunks: Sequence[LanguageModel],
        place: PipelinePlace,
        dims: ParallelDims,
        cfg: Config,
    ) -> None:
        self.chunks, self.place, self.dims, self.cfg = chunks, place, dims, cfg

    def __call__(
        self, micro_batches: Sequence[Tensor], update: Update, collect_stats: bool
    ) -> tuple[Tensor, ChunkStats | None]:
        t, device, cp = self.cfg.train, self.dims.device, self.dims.context
        dtype = next(self.chunks[0].parameters()).dtype
        stats: ChunkStats | None = {} if collect_stats else None
        with autocast_for(t.precision, device):
            loss = pipeline_step(
                self.chunks, self.place, [cp.chunk(m).to(device) for m in micro_batches],
                stage_forward(dtype, stats), seq_length=t.seq_length,
                micro_batch_size=t.micro_batch_size, hidden_size=self.cfg.model.width,
                dtype=dtype, sequence_parallel=self.dims.sequence_parallel,
            )  # fmt: skip
        return broadcast_loss(loss, self.place, device), stats


class TrainStep:
    """Gradients of one global batch (this rank's rows), then the update."""

    def __init__(
        self,
        forward_backward: MicroBatchLoop | PipelineSchedule,
        update: OptimizerUpdate | ZeroUpdate,
        modules: Sequence[nn.Module],
        dims: ParallelDims,
        micro_batch_size: int,
    ) -> None:
        self.forward_backward, self.update = forward_backward, update
        self.modules, self.dims, self.micro_batch_size = modules, dims, micro_batch_size

    def __call__(self, batch: Tensor, collect_stats: bool) -> StepResult:
        for module in self.modules:
            module.train()
        micro_batches = batch.split(self.micro_batch_size)
        loss, chunk_stats = self.forward_backward(micro_batches, self.update, collect_stats)
        stats = summarize(chunk_stats, self.dims) if chunk_stats is not None else None
        if self.dims.replicas > 1:
            loss = average(loss, self.dims.dp_group(), self.dims.replicas)
        total = float(loss)
        norm, applied, spike = self.update.apply(total)
        return StepResult(total, norm, stats, applied, spike)


def train_step_for(
    cfg: Config,
    dims: ParallelDims,
    place: PipelinePlace,
    chunks: Sequence[LanguageModel],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    zero: ZeroEngine | None = None,
    guard: SpikeGuard | None = None,
) -> TrainStep:
    """The run's step: the pipeline schedule when ``place`` has stages, else the micro-batch
    loop; DeepSpeed's update under ZeRO, else ours (with the overlapped data-parallel
    reduction where it applies)."""
    t = cfg.train
    update: OptimizerUpdate | ZeroUpdate
    if zero is not None:
        update = ZeroUpdate(zero, chunks, dims, guard)
    else:
        overlap = overlapped_reduce_for(cfg, dims, model)
        clip = cfg.optimizer.clip_grad
        update = OptimizerUpdate(chunks, optimizer, scheduler, dims, clip, overlap, guard)
    forward_backward: MicroBatchLoop | PipelineSchedule = (
        PipelineSchedule(chunks, place, dims, cfg)
        if place.active
        else MicroBatchLoop(chunks[0], dims, t.precision, t.compile)
    )
    return TrainStep(forward_backward, update, chunks, dims, t.micro_batch_size)
