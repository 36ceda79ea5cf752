"""Initialisers of the reference implementation (github.com/renll/SeqBoat), recorded on the
parameters they initialise.

A module says how each of its parameters' whole tensors is initialised (``initialize_``,
``init_linear_``): the rule is applied at once from the default random stream (a module
built on its own, as in the tests), and kept on the parameter for
``parallel.materialize.materialize_``, which re-applies it from per-parameter streams when a
``LanguageModel`` is built (the same weights on any tensor/pipeline split). A rule is a
picklable ``(tensor, generator) -> None`` that fills the whole, unsplit tensor.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from parallel.materialize import Initializer, initializer_of, set_initializer

_BLOCK = 2**20


@torch.no_grad()
def trunc_normal_(
    tensor: Tensor, std: float, mean: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Normal(mean, std) truncated at +-2 std, as the reference's initialiser.

    By rejection: standard normals, and only those outside +-2 (4.6% of them) drawn again
    until none is. ``nn.init.trunc_normal_`` redraws the whole tensor each round (six passes
    over it), which made it the bulk of a large model's build time."""
    flat = tensor.view(-1)
    flat.normal_(generator=generator)
    # Found block by block: a whole-tensor ``abs()`` would double the memory of the build.
    blocks = flat.split(_BLOCK)
    redo = torch.cat([(b.abs() > 2).nonzero().view(-1) + i * _BLOCK for i, b in enumerate(blocks)])
    while redo.numel():
        fresh = flat.new_empty(redo.numel()).normal_(generator=generator)
        flat[redo] = fresh
        redo = redo[fresh.abs() > 2]
    return flat.mul_(std).add_(mean).view_as(tensor)


def _trunc_normal(tensor: Tensor, generator: torch.Generator | None, *, std: float) -> None:
    trunc_normal_(tensor, std=std, generator=generator)


def _normal(tensor: Tensor, generator: torch.Generator | None, *, std: float) -> None:
    nn.init.normal_(tensor, std=std, generator=generator)


def _constant(tensor: Tensor, generator: torch.Generator | None, *, value: float) -> None:
    tensor.fill_(value)


def trunc_normal(std: float) -> Initializer:
    """N(0, std) truncated at +-2 std."""
    return functools.partial(_trunc_normal, std=std)


def normal(std: float) -> Initializer:
    return functools.partial(_normal, std=std)


def constant(value: float) -> Initializer:
    return functools.partial(_constant, value=value)


@torch.no_grad()
def initialize_(param: Tensor, init: Initializer) -> None:
    """Records ``init`` as ``param``'s rule and applies it now from the default stream (not
    on the meta device: that model is materialized later)."""
    set_initializer(param, init)
    if not param.is_meta:
        init(param, None)


def init_linear_(layer: nn.Module, std: float = 0.02) -> nn.Module:
    """TN(0, std) weight, zero bias; for nn.Linear and megatron-core's parallel linears."""
    initialize_(layer.weight, trunc_normal(std))
    if layer.bias is not None:
        initialize_(layer.bias, constant(0.0))
    return layer


@torch.no_grad()
def reset_(module: nn.Module) -> None:
    """Applies every parameter's recorded rule again, from the default stream, in order."""
    for name, param in module.named_parameters():
        initializer_of(param, name)(param, None)
