"""Pipeline parallelism: how the layers split into stages, and megatron-core's schedules.

The model is cut into ``pipeline x virtual_stages`` model chunks of consecutive layers. With
megatron's interleaved convention, virtual chunk ``v`` of pipeline rank ``r`` is model chunk
``v * pipeline + r``: rank 0 holds chunks 0, P, 2P, ..., so an activation visits every rank
once per virtual round. The first model chunk also holds the embedding, the last one the
final norm, head and loss (and, with a tied head, a copy of the embedding weight whose
gradient ``parallel.grads.sync_tied_grads`` sums with the first stage's).

The schedules are megatron-core's (1F1B, interleaved 1F1B); this module only adapts them:
a ``ModelParallelConfig`` for the p2p traffic (shape ``[seq/cp(/tp), micro batch, hidden]``
in ``pipeline_dtype``; no batched p2p on gloo; no megatron gradient finalization: data- and
tensor-parallel gradient reduction stay ours), a wrapper giving each chunk the attributes
the schedules look up, and a loss hook that makes megatron scale each micro-batch's loss by
1/m and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel import cpu_compat
from parallel.dims import ParallelDims


@dataclass(frozen=True)
class Stage:
    """What one model chunk holds: the embedding (``first``), the final norm, head and loss
    (``last``), and the global indices of its layers."""

    first: bool
    last: bool
    layers: range

    @classmethod
    def whole(cls, num_layers: int) -> Stage:
        """The whole model as one stage (no pipeline)."""
        return cls(first=True, last=True, layers=range(num_layers))


def chunk_layer_ranges(
    num_layers: int, pipeline: int, virtual_stages: int = 1, stage_layers: Sequence[int] = ()
) -> list[range]:
    """The global layer range of every model chunk, in layer order (chunk ``c`` runs on
    pipeline rank ``c % pipeline`` as its virtual chunk ``c // pipeline``).

    ``stage_layers`` gives each chunk's number of layers; empty: an even split."""
    chunks = pipeline * virtual_stages
    if pipeline < 1 or virtual_stages < 1:
        raise ValueError(f"pipeline {pipeline} and virtual_stages {virtual_stages} must be >= 1")
    if virtual_stages > 1 and pipeline == 1:
        raise ValueError("virtual_stages > 1 needs pipeline > 1")
    if stage_layers:
        counts = list(stage_layers)
        if len(counts) != chunks or min(counts) < 1 or sum(counts) != num_layers:
            raise ValueError(
                f"stage_layers {counts} must be {chunks} positive counts summing to {num_layers}"
            )
    else:
        if num_layers % chunks:
            raise ValueError(
                f"{num_layers} layers do not split evenly into {chunks} chunks "
                f"(pipeline {pipeline} x virtual_stages {virtual_stages}): give stage_layers"
            )
        counts = [num_layers // chunks] * chunks
    starts = [sum(counts[:c]) for c in range(chunks)]
    return [range(start, start + count) for start, count in zip(starts, counts, strict=True)]


@dataclass(frozen=True)
class PipelinePlace:
    """This rank's place in its pipeline group and the model chunks it holds (in virtual
    order: ``stages[v]`` is model chunk ``v * size + rank``)."""

    size: int
    rank: int
    virtual_size: int
    stages: tuple[Stage, ...]

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @classmethod
    def build(
        cls, num_layers: int, size: int, rank: int, virtual_size: int = 1,
        stage_layers: Sequence[int] = (),
    ) -> PipelinePlace:  # fmt: skip
        ranges = chunk_layer_ranges(num_layers, size, virtual_size, stage_layers)
        chunks = size * virtual_size
        stages = tuple(
            Stage(first=c == 0, last=c == chunks - 1, layers=ranges[c])
            for c in (v * size + rank for v in range(virtual_size))
        )
        return cls(size=size, rank=rank, virtual_size=virtual_size, stages=stages)


def _schedule_config(
    place: PipelinePlace, hidden_size: int, dtype: torch.dtype, sequence_parallel: bool
) -> Any:
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    config = ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        pipeline_model_parallel_size=place.size,
        virtual_pipeline_model_parallel_size=place.virtual_size if place.virtual_size > 1 else None,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        # gloo has no batched p2p: with it the interleaved schedule is silently wrong
        # (tests/test_pipeline.py catches it); NCCL does not need it either at our sizes.
        batch_p2p_comm=False,
        # Gradient reduction (data, tensor, tied embedding) is ours, after the schedule.
        finalize_model_grads_func=None,
    )
    # TransformerConfig fields the schedules read: the p2p width, and two switches off.
    config.hidden_size = hidden_size
    config.calculate_per_token_loss = False
    config.fine_grained_activation_offloading = False
    return config


class _Scheduled(nn.Module):
    """A model chunk as megatron-core's schedules look at it: ``config`` and ``model_type``
    here, ``set_input_tensor`` on the chunk (found through ``.module``)."""

    def __init__(self, chunk: nn.Module, config: Any) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        self.module = chunk
        self.config = config
        self.model_type = ModelType.encoder_or_decoder


def _report_loss(loss: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    # The (loss, token count, logged) form with a count of 1: megatron then only divides the
    # loss by the number of micro-batches. Its (loss, logged) form would also multiply by the
    # context-parallel size, which our own gradient averaging already accounts for.
    return loss, torch.ones((), dtype=torch.int), {"loss": loss.detach().clone()}


def _activation_shape(
    seq_length: int, micro_batch_size: int, hidden_size: int, sequence_parallel: bool
) -> tuple[int, int, int]:
    """What megatron-core's p2p sends and receives: [seq / cp (/ tp), micro batch, hidden]."""
    from megatron.core import parallel_state

    length = seq_length // parallel_state.get_context_parallel_world_size()
    if sequence_parallel:
        length //= parallel_state.get_tensor_model_parallel_world_size()
    return (length, micro_batch_size, hidden_size)


def pipeline_step(
    chunks: Sequence[nn.Module],
    place: PipelinePlace,
    micro_batches: Sequence[Any],
    step_fn: Callable[[nn.Module, Any], Tensor],
    *,
    seq_length: int,
    micro_batch_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    sequence_parallel: bool = False,
    forward_only: bool = False,
) -> Tensor | None:
    """Runs one step's schedule (1F1B, interleaved with ``place.virtual_size > 1``) over
    ``micro_batches`` on this rank's ``chunks`` (one per stage of ``place``, each with
    ``set_input_tensor``), backward included unless ``forward_only``.

    ``step_fn(chunk, micro_batch)`` runs one chunk: on the last stage it returns the
    micro-batch's mean loss, elsewhere the activation for the next stage, shaped
    ``[seq_length / cp (/ tp under sequence parallelism), micro_batch_size, hidden_size]``
    in ``dtype``. Gradients accumulate as those of the mean loss over the micro-batches.
    Returns that mean loss (detached) on the last pipeline stage, None elsewhere; gradient
    reduction (``parallel.grads``) is left to the caller."""
    if len(chunks) != len(place.stages):
        raise ValueError(f"{len(chunks)} model chunks for {len(place.stages)} stages")
    m = len(micro_batches)
    if m < 1:
        raise ValueError("no micro-batches")
    if place.virtual_size > 1 and m % place.size:
        raise ValueError(
            f"the interleaved schedule needs a multiple of pipeline size {place.size} "
            f"micro-batches, got {m}"
        )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cpu_compat.route_schedules_to_cpu()
    config = _schedule_config(place, hidden_size, dtype, sequence_parallel)
    wrapped = [_Scheduled(chunk, config) for chunk in chunks]
    sends = {id(w): not stage.last for w, stage in zip(wrapped, place.stages, strict=True)}
    shape = _activation_shape(seq_length, micro_batch_size, hidden_size, sequence_parallel)

    def forward_step(data_iterator, model: _Scheduled):
        out = step_fn(model.module, next(data_iterator))
        if sends[id(model)] and (tuple(out.shape) != shape or out.dtype != dtype):
            # The receiver allocates shape x dtype blindly: a mismatch would be garbage.
            raise ValueError(
                f"stage output {tuple(out.shape)} {out.dtype}, the schedule sends {shape} {dtype}"
            )
        return out, _report_loss

    schedule = get_forward_backward_func(
        place.size, place.virtual_size if place.virtual_size > 1 else None
    )
    single = len(wrapped) == 1
    with torch.no_grad() if forward_only else torch.enable_grad():
        reported = schedule(
            forward_step_func=forward_step,
            # Each chunk sees the micro-batches in order, so each gets its own iterator.
            data_iterator=iter(micro_batches) if single else [iter(micro_batches) for _ in wrapped],
            model=wrapped[0] if single else wrapped,
            num_microbatches=m,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    for chunk in chunks:  # drop the last received activation
        set_input = getattr(chunk, "set_input_tensor", None)
        if set_input is not None:
            set_input(None)
    if not place.is_last:
        return None
    return torch.stack([r["loss"] for r in reported]).mean()


def broadcast_loss(loss: Tensor | None, place: PipelinePlace, device: torch.device) -> Tensor:
    """The last stage's ``loss`` on every rank of the pipeline group (float64 scalar)."""
    value = (
        loss.detach().to(device=device, dtype=torch.float64).reshape(())
        if loss is not None
        else torch.zeros((), dtype=torch.float64, device=device)
    )
    if not place.active:
        return value
    from megatron.core import parallel_state

    dist.broadcast(
        value,
        parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return value


def merge_over_stages(state: dict[str, Any], dims: ParallelDims) -> dict[str, Any]:
    """The union of the pipeline stages' ``state`` dicts, keyed by global names (a tied
    copy equals its original). Collective over the pipeline group; ``state`` itself without
    a pipeline."""
    if dims.pp_size == 1:
        return state
    parts: list[Any] = [None] * dims.pp_size
    dist.all_gather_object(parts, state, group=dims.pp_group())
    return {k: v for part in parts for k, v in part.items()}
