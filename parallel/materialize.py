"""Initialising a model one parameter at a time, each from its own random stream, keeping
this rank's tensor-parallel slice only.

A module records on each parameter how the whole, unsplit tensor is initialised
(``set_initializer``: a function filling a tensor from a ``torch.Generator``). ``materialize_``
then walks the model's parameters; for each it fills the full tensor on the CPU from a
generator seeded by (seed, the parameter's global name), keeps this rank's slice (the
``partition_dim`` megatron-core's layers and ``parallel.layout`` record, cut as
``shard_state_dict`` cuts it) and frees the rest. A parameter's values therefore depend on
neither the order of construction nor which other parameters a rank holds: every pipeline
stage and tensor-parallel rank gets exactly its slice of the single-process model of the same
seed, while holding its own shard plus at most one full parameter.

Parameters on the meta device (a model built under ``torch.device("meta")``: no memory, no
init) are replaced by real ones; real ones are overwritten in place. This is megatron-core's
``use_cpu_initialization`` (each full master weight built on the CPU, then split), with
torchtitan's meta-device construction in front; unlike megatron-core's single CPU stream, the
per-parameter streams make the weights independent of the pipeline split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from parallel.layout import is_split
from parallel.tensor import TensorParallel

# Fills a whole (unsplit) tensor in place from the generator (None: the default stream).
Initializer = Callable[[Tensor, torch.Generator | None], object]

_ATTR = "initializer"


def set_initializer(param: Tensor, init: Initializer) -> None:
    """Records how ``param``'s whole tensor is initialised (read by ``materialize_``)."""
    setattr(param, _ATTR, init)


def initializer_of(param: Tensor, name: str = "parameter") -> Initializer:
    init = getattr(param, _ATTR, None)
    if init is None:
        raise ValueError(f"{name} has no initializer (set_initializer in its module)")
    return init


def draw_seed() -> int:
    """One draw from the default CPU generator: the model seed. Every rank seeds that
    stream identically before building, so they all draw the same (as torch's DataLoader
    draws its base seed)."""
    return int(torch.empty((), dtype=torch.int64, device="cpu").random_().item())


def parameter_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s stream: a hash of (model seed, global name), the same
    in every process (unlike Python's ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def full_shape(param: Tensor, tp: TensorParallel) -> torch.Size:
    """The single-process shape of ``param`` (a tensor-parallel shard's, times the group
    size along its partition dimension)."""
    shape = list(param.shape)
    if tp.active and is_split(param):
        if getattr(param, "partition_stride", 1) != 1:
            raise NotImplementedError("strided tensor-parallel partitions")
        shape[param.partition_dim] *= tp.size
    return torch.Size(shape)


@torch.no_grad()
def full_parameter(param: Tensor, name: str, seed: int, tp: TensorParallel) -> Tensor:
    """The single-process value of ``param`` (named ``name`` in the whole model) on the CPU."""
    full = torch.empty(full_shape(param, tp), dtype=param.dtype, device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
    initializer_of(param, name)(full, generator)
    return full


def local_slice(full: Tensor, param: Tensor, tp: TensorParallel) -> Tensor:
    """This rank's part of the single-process tensor ``full`` (``shard_state_dict``'s cut)."""
    if tp.active and is_split(param):
        return full.chunk(tp.size, dim=param.partition_dim)[tp.rank]
    return full


@torch.no_grad()
def materialize_(
    model: nn.Module, seed: int, tp: TensorParallel = TensorParallel(),
    device: torch.device | str | None = None,
) -> nn.Module:  # fmt: skip
    """Initialises every parameter of ``model`` to this rank's slice of the single-process
    model of ``seed`` (see the module docstring). Parameter names are ``model``'s own: the
    model must name its parameters globally (a pipeline stage keys its layers by global
    index). Meta parameters become real ones on ``device`` (default: the current default
    device), keeping their attributes (split layout, initializer); others stay where they are.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    replaced: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for leaf, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in replaced:  # shared: initialised under its first name
                module._parameters[leaf] = replaced[id(param)]
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            split = tp.active and is_split(param)
            if param.is_meta:
                # The shard is allocated before the full tensor, so that freeing the full
                # one leaves no hole below it (an allocator returns the top of its heap).
                shard = torch.empty_like(param, device=device) if split else None
                full = full_parameter(param, name, seed, tp)
                data = shard.copy_(local_slice(full, param, tp)) if split else full.to(device)
                new = nn.Parameter(data, requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)  # split layout, initializer, ...
                module._parameters[leaf] = new
                replaced[id(param)] = new
            else:
                full = full_parameter(param, name, seed, tp)
                param.copy_(local_slice(full, param, tp))
            del full  # at most one full parameter alive at a time
    _check_no_meta(model)
    return model


def _check_no_meta(model: nn.Module) -> None:
    """Nothing of ``model`` may stay on the meta device: a buffer, or a tensor a module keeps
    as a plain attribute (it would still point at the meta parameter)."""
    for module_name, module in model.named_modules():
        for key, value in [*module._buffers.items(), *vars(module).items()]:
            if isinstance(value, Tensor) and value.is_meta:
                where = f"{module_name}.{key}" if module_name else key
                raise RuntimeError(f"{where} is still on the meta device after materialize_")
