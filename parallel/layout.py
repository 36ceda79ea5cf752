"""How a parameter would be split under tensor parallelism, recorded on the parameter itself.

The attribute names are megatron-core's (``tensor_model_parallel``, ``partition_dim``,
``partition_stride``), so megatron-core's checkpointing and gradient code read them
unchanged. Setting them costs nothing on a single process.
"""

from __future__ import annotations

from torch import nn


def mark_tensor_parallel(param: nn.Parameter, dim: int, stride: int = 1) -> None:
    """``param`` is split along ``dim`` across the tensor-parallel ranks."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


def is_split(param: nn.Parameter) -> bool:
    """Whether ``param`` is split across the tensor-parallel ranks."""
    return bool(getattr(param, "tensor_model_parallel", False))


def mark_replicated(param: nn.Parameter) -> None:
    """``param`` is held whole, identically, on every tensor-parallel rank."""
    param.tensor_model_parallel = False
    param.partition_dim = -1
    param.partition_stride = 1


def mark_sequence_parallel(module: nn.Module) -> None:
    """``module``'s weights act on sequence shards under Megatron sequence parallelism, so
    each rank's gradient is partial and is summed over the tensor group (megatron-core's
    ``sequence_parallel`` attribute)."""
    for p in module.parameters():
        p.sequence_parallel = True


def mark_partial_grad(param: nn.Parameter) -> None:
    """``param`` is replicated but each tensor-parallel rank computes only part of its
    gradient (it sits on the path of a column-split activation's gradient): the parts are
    summed over the tensor group."""
    param.partial_grad = True


def holds_partial_grad(param: nn.Parameter, sequence_parallel: bool) -> bool:
    """Whether each tensor-parallel rank holds only part of ``param``'s gradient, to be
    summed over the tensor group: ``mark_partial_grad``, or ``mark_sequence_parallel``
    when sequence parallelism is on."""
    return bool(getattr(param, "partial_grad", False)) or (
        sequence_parallel and bool(getattr(param, "sequence_parallel", False))
    )
