"""Tensor parallelism as SeqBoat needs it, built from megatron-core's layers and mappings.

A model takes a ``TensorParallel`` (``ParallelDims.tensor``; the default, size 1: plain
single-process modules, no process group needed). With size > 1 the factories return megatron-core's
Column/RowParallelLinear and VocabParallelEmbedding, and the region functions are
megatron-core's autograd mappings; with size 1 they are the identity.

Regions used by a SeqBoat layer (the table in README.md, "Parallel training"):
  * ``enter_channel_split``: the full-width normed input, sliced to this rank's EMA channels;
    its backward sums the channel-partial gradients across the group.
  * ``gather_channels``: the compressed activated tokens' channels, all-gathered (M x D, so
    this traffic shrinks with the activation ratio).
  * ``copy_to_group``: a replicated tensor whose gradient each rank holds only part of
    (backward all-reduce).
  * ``gather_sequence`` / ``scatter_sequence``: Megatron sequence parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.layout import is_split


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group."""

    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    @property
    def active(self) -> bool:
        return self.size > 1

    def group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    def local(self, width: int, what: str = "width") -> int:
        if width % self.size:
            raise ValueError(f"{what} {width} is not divisible by tensor parallel size {self.size}")
        return width // self.size

    def channel_slice(self, width: int) -> slice:
        part = self.local(width)
        return slice(self.rank * part, (self.rank + 1) * part)


def _megatron_config(tp: TensorParallel, sequence_parallel: bool):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp.size,
        sequence_parallel=sequence_parallel,
        # Like nn.Linear: the default dtype; models are cast with .to() afterwards.
        params_dtype=torch.get_default_dtype(),
        # Weights are loaded from the single-process model's split (same init as 1 process).
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


def _no_init(weight: Tensor) -> None:
    pass


def _column_cls():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        """megatron-core's ColumnParallelLinear with the nn.Linear call convention."""

        def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return ColumnLinear


def _row_cls():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowLinear(RowParallelLinear):
        """megatron-core's RowParallelLinear with the nn.Linear call convention."""

        def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return RowLinear


def column_linear(
    d_in: int, d_out: int, tp: TensorParallel, bias: bool = True,
    sequence_parallel: bool = False,
) -> nn.Module:  # fmt: skip
    """Output features split over the group; the input is whole (or sequence-sharded under
    ``sequence_parallel``, then gathered inside)."""
    if not tp.active:
        return nn.Linear(d_in, d_out, bias=bias)
    return _column_cls()(
        d_in, d_out, config=_megatron_config(tp, sequence_parallel), init_method=_no_init,
        bias=bias, gather_output=False,
    )  # fmt: skip


def row_linear(
    d_in: int, d_out: int, tp: TensorParallel, bias: bool = True,
    sequence_parallel: bool = False,
) -> nn.Module:  # fmt: skip
    """Input features split over the group; the output is all-reduced (reduce-scattered
    along the sequence under ``sequence_parallel``)."""
    if not tp.active:
        return nn.Linear(d_in, d_out, bias=bias)
    return _row_cls()(
        d_in, d_out, config=_megatron_config(tp, sequence_parallel), init_method=_no_init,
        bias=bias, input_is_parallel=True, skip_bias_add=False,
    )  # fmt: skip


def vocab_embedding(vocab: int, width: int, tp: TensorParallel) -> nn.Module:
    """Embedding rows split over the group (vocab-parallel)."""
    if not tp.active:
        return nn.Embedding(vocab, width)
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    return VocabParallelEmbedding(
        vocab, width, init_method=_no_init, config=_megatron_config(tp, False),
        reduce_scatter_embeddings=tp.sequence_parallel,
    )  # fmt: skip


def embed(embedding: nn.Module, tokens: Tensor, tp: TensorParallel) -> Tensor:
    """tokens [B, L] -> [L, B, D] ([L/tp, B, D] under sequence parallelism)."""
    if tp.sequence_parallel:
        return embedding(tokens)  # megatron transposes and reduce-scatters itself
    return embedding(tokens.t())


def lm_logits(h: Tensor, weight: Tensor, tp: TensorParallel) -> Tensor:
    """h [L(/tp), B, D] -> this rank's vocabulary slice of the logits [L, B, V/tp]."""
    if tp.active:
        h = gather_sequence(h, tp) if tp.sequence_parallel else copy_to_group(h, tp)
    return F.linear(h, weight)


def cross_entropy(logits: Tensor, targets: Tensor, tp: TensorParallel) -> Tensor:
    """logits [L, B, V(/tp)], targets [L, B] -> per-token loss [L, B] (float32 or wider)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if tp.active:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, targets)
    length, batch, vocab = logits.shape
    losses = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    return losses.view(length, batch)


# --------------------------------------------------------------------------- regions


def copy_to_group(x: Tensor, tp: TensorParallel) -> Tensor:
    """Forward identity, backward all-reduce: a replicated tensor used by split compute."""
    if not tp.active:
        return x
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(x))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    megatron-core 0.16's ``_reduce`` all-reduces ``grad.contiguous()`` but returns ``grad``:
    a non-contiguous gradient (e.g. one that arrives through a dispatch all-to-all and a
    ``cat``) would silently skip the reduction. Placed after the copy in the forward, this
    runs before its backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def enter_channel_split(h: Tensor, tp: TensorParallel) -> Tensor:
    """[L(/tp), B, D] -> [L, B, D/tp]: the whole sequence, this rank's channels.

    Each rank's gradient covers only its channels; the backward of the gather (reduce-
    scatter) or of the copy (all-reduce) sums them into the complete gradient.
    """
    if not tp.active:
        return h
    full = gather_sequence(h, tp) if tp.sequence_parallel else copy_to_group(h, tp)
    return full[..., tp.channel_slice(full.shape[-1])]


def gather_channels(x: Tensor, tp: TensorParallel) -> Tensor:
    """[..., D/tp] -> [..., D], backward: this rank's slice (the gradient must be complete)."""
    if not tp.active:
        return x
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(x)


def gather_sequence(x: Tensor, tp: TensorParallel, complete_grad: bool = False) -> Tensor:
    """[L/tp, ...] -> [L, ...]. Backward reduce-scatters partial gradients, or, with
    ``complete_grad`` (every rank already holds the whole gradient), keeps this rank's part."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=not complete_grad)


def scatter_sequence(x: Tensor, tp: TensorParallel) -> Tensor:
    """[L, ...] identical on all ranks -> this rank's [L/tp, ...]; backward all-gathers."""
    if not tp.sequence_parallel:
        return x
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

    return scatter_to_sequence_parallel_region(x)


def broadcast_decision(activated: Tensor, tp: TensorParallel) -> Tensor:
    """Makes every rank of the group take rank 0's routing decision.

    The logits are all-reduced, so they agree to the last bit on the backends we test, but
    a data-dependent branch must not rest on that: one broadcast of L x B booleans.
    """
    if not tp.active:
        return activated
    from megatron.core import parallel_state

    decision = activated.to(torch.uint8)
    dist.broadcast(decision, parallel_state.get_tensor_model_parallel_src_rank(), group=tp.group())
    return decision.bool()


class SplitDropout(nn.Dropout):
    """Dropout in a tensor-split region: each rank's part draws its own mask, from
    megatron-core's model-parallel RNG stream (different per tensor-parallel rank)."""

    def __init__(self, p: float, split: bool) -> None:
        super().__init__(p)
        self.split = split  # False: a replicated region, the ordinary stream

    def forward(self, x: Tensor) -> Tensor:
        if not self.split or not self.training or self.p == 0:
            return super().forward(x)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return super().forward(x)


# --------------------------------------------------------------------------- weights


def shard_state_dict(full: dict[str, Tensor], model: nn.Module, tp: TensorParallel) -> dict:
    """The single-process ``full`` state dict cut into ``model``'s tensor-parallel shards,
    using the split each parameter records (megatron-core's ``partition_dim``)."""
    out = {}
    params = dict(model.named_parameters())
    for name, local in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        if name not in full:
            raise KeyError(f"{name} is missing from the full state dict")
        tensor = full[name]
        param = params.get(name)
        if param is not None and is_split(param) and tp.active:
            tensor = tensor.chunk(tp.size, dim=param.partition_dim)[tp.rank]
        if tensor.shape != local.shape:
            raise ValueError(f"{name}: shard {tuple(tensor.shape)} != local {tuple(local.shape)}")
        out[name] = tensor.clone()
    return out


def gather_split(x: Tensor, dim: int, tp: TensorParallel) -> Tensor:
    """All ranks' shards of ``x`` concatenated along ``dim`` (no autograd)."""
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group())
    return torch.cat(parts, dim)


def full_state_dict(model: nn.Module, tp: TensorParallel) -> dict[str, Tensor]:
    """The single-process state dict, tensor-parallel shards gathered (collective over the
    tensor group); the inverse of ``shard_state_dict``."""
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        param = params.get(name)
        if tp.active and param is not None and is_split(param):
            tensor = gather_split(tensor, param.partition_dim, tp)
        out[name] = tensor.detach().clone()
    return out
