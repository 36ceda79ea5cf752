"""megatron-core sharded state dicts of a model and of its torch optimizer, built from the
split information the parameters carry (``parallel.layout``: megatron-core's
``tensor_model_parallel`` / ``partition_dim``).

Keys are global: the model's own state-dict keys (``model.layers.5.gau.v_proj.weight``) and,
for the optimizer, ``optimizer.<parameter key>.<state name>``. A tensor-split parameter is
one chunk along its partition dim; everything else is whole. Each shard is written by its
main replica only (replica id all zeros): the tensor-parallel rank 0 copy of a replicated
tensor, data/context copy 0 (or, after ``spread_writes``, one copy chosen per tensor, so
that the data-parallel ranks share the writing), and, through ``Place.owner``, the pipeline
stage that owns a key (a later stage holding a copy of ``embedding.weight`` answers
non-zero).

Because the layout on disk is the whole tensors' (megatron-core/PyTorch distributed
checkpoint), a checkpoint loads into any tensor/context/data split: resharding is free.

Optimizer state: every per-parameter tensor whose shape is the parameter's (Adam's moments)
is sharded like the parameter; the others (Adam's ``step`` counter, 0-d moments of 0-d
parameters) are stored whole, as 1-d tensors. The hyper-parameters and the shapes of the
state go into a small ``optimizer_record`` (a plain dict) that the caller keeps elsewhere:
loading needs it to build the tensors to load into.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from parallel.layout import is_split

MODEL = "model."
OPTIMIZER = "optimizer."
# Shape tag of an optimizer state tensor that has its parameter's shape (and split).
PARAM_SHAPED = "param"


@dataclass(frozen=True)
class Place:
    """Where this rank's tensors sit in the whole.

    ``replica``: this rank's index among the ``replicas`` data/context-parallel copies
    (copy 0 writes, unless ``spread_writes`` shares the writing out).
    ``owner``: for pipeline stages, ``key -> 0`` when this rank is the main owner of the
    (model) key, non-zero for a copy (e.g. a tied embedding on the last stage).
    """

    tp_rank: int = 0
    tp_size: int = 1
    replica: int = 0
    replicas: int = 1
    owner: Callable[[str], int] | None = None

    def replica_id(self, key: str, split: bool) -> tuple[int, int, int]:
        stage_copy = self.owner(key) if self.owner is not None else 0
        return (stage_copy, 0 if split else self.tp_rank, self.replica)


def _sharded(key: str, data: Tensor, param: Tensor | None, place: Place, owner_key: str):
    """A ShardedTensor of ``data``: split like ``param`` when that is tensor-parallel."""
    from megatron.core.dist_checkpointing import ShardedTensor

    split = param is not None and is_split(param) and place.tp_size > 1
    offsets = [(param.partition_dim, place.tp_rank, place.tp_size)] if split else []
    return ShardedTensor.from_rank_offsets(
        key, data, *offsets, replica_id=place.replica_id(owner_key, split)
    )


def spread_writes(sharded: dict, place: Place) -> dict:
    """Shares the writing of ``sharded`` out over the data/context-parallel copies: each
    tensor gets one writer copy, assigned greedily by size (largest first, to the copy with
    the fewest bytes so far). Every copy holds the same keys and shapes, so every copy
    computes the same assignment. Changes the replica ids in place; returns ``sharded``."""
    if place.replicas <= 1:
        return sharded
    written = [0] * place.replicas
    for key in sorted(sharded, key=lambda k: (-sharded[k].data.numel(), k)):
        writer = min(range(place.replicas), key=written.__getitem__)
        written[writer] += sharded[key].data.numel()
        stage_copy, tp_copy, _ = sharded[key].replica_id
        data_copy = (place.replica - writer) % place.replicas
        sharded[key].replica_id = (stage_copy, tp_copy, data_copy)
    return sharded


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict without megatron's ``_extra_state`` entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def model_sharded_state_dict(model: nn.Module, place: Place, template: bool = False) -> dict:
    """``{"model.<key>": ShardedTensor}`` of ``model``'s state; with ``template``, fresh
    tensors of the same shapes to load into (the model itself is left alone)."""
    params = dict(model.named_parameters())
    out = {}
    for key, tensor in model_tensors(model).items():
        data = torch.empty_like(tensor) if template else tensor.detach()
        out[MODEL + key] = _sharded(MODEL + key, data, params.get(key), place, key)
    return out


def load_model(model: nn.Module, loaded: dict[str, Tensor]) -> None:
    """Copies the tensors of a loaded ``model_sharded_state_dict`` into ``model``."""
    state = {k[len(MODEL) :]: v for k, v in loaded.items() if k.startswith(MODEL)}
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- optimizer


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _named_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple[str, Tensor]]:
    names = _param_names(model)
    return [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]


def optimizer_record(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """What loading the optimizer needs besides its tensors: each group's hyper-parameters,
    each parameter's non-tensor state, and the shape (``PARAM_SHAPED`` or a list) and
    dtype of each state tensor. Plain Python: it goes into a ``weights_only`` file."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    shapes: dict[str, dict[str, Any]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, p in _named_params(optimizer, model):
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, Tensor):
                shape = PARAM_SHAPED if _param_shaped(v, p) else list(v.shape)
                dtype = str(v.dtype).removeprefix("torch.")
                shapes.setdefault(name, {})[k] = {"shape": shape, "dtype": dtype}
            else:
                scalars.setdefault(name, {})[k] = v
    return {"param_groups": groups, "shapes": shapes, "scalars": scalars}


def _param_shaped(v: Tensor, p: Tensor) -> bool:
    return v.ndim > 0 and v.shape == p.shape


def optimizer_sharded_state_dict(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    place: Place,
    record: dict[str, Any] | None = None,
) -> dict:
    """``{"optimizer.<param key>.<state name>": ShardedTensor}``: the optimizer's current
    state, or, given a saved ``record``, empty tensors of the saved shapes to load into."""
    out = {}
    for name, key, v, p in _optimizer_state(optimizer, model, record):
        if _param_shaped(v, p):
            out[key] = _sharded(key, v, p, place, name)
        else:  # whole on every rank, saved as 1-d (megatron shards need a dimension)
            out[key] = _sharded(key, v.reshape(-1), None, place, name)
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Tensor]:
    """The tensors of ``optimizer_sharded_state_dict``, keyed like it, as they are (no
    megatron objects: a cheap look at what it would hold)."""
    return {key: v for _, key, v, _ in _optimizer_state(optimizer, model)}


def _optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, record: dict[str, Any] | None = None
) -> Iterator[tuple[str, str, Tensor, Tensor]]:
    """(parameter key, state key, state tensor, parameter) of each state tensor: the
    current ones, or, given a saved ``record``, empty ones of the saved shapes."""
    for name, p in _named_params(optimizer, model):
        if record is None:
            items = optimizer.state.get(p, {}).items()
            state = {k: v.detach() for k, v in items if isinstance(v, Tensor)}
        else:
            specs = record["shapes"].get(name, {}).items()
            state = {k: _empty_state(spec, p) for k, spec in specs}
        for k, v in state.items():
            yield name, f"{OPTIMIZER}{name}.{k}", v, p


def _empty_state(spec: dict[str, Any], p: Tensor) -> Tensor:
    """A tensor to load one saved state tensor into (its saved dtype: Adam's step is
    float32 whatever the parameter's)."""
    shape = p.shape if spec["shape"] == PARAM_SHAPED else spec["shape"]
    return torch.empty(shape, dtype=getattr(torch, spec["dtype"]), device=p.device)


def load_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    record: dict[str, Any],
    loaded: dict[str, Tensor],
) -> None:
    """Restores ``optimizer`` from a saved ``record`` and its loaded sharded tensors
    (through ``optimizer.load_state_dict``, which casts and places them)."""
    named = _named_params(optimizer, model)
    index = {name: i for i, (name, _) in enumerate(named)}
    state: dict[int, dict[str, Any]] = {}
    for name, _ in named:
        entry: dict[str, Any] = dict(record["scalars"].get(name, {}))
        for k, spec in record["shapes"].get(name, {}).items():
            v = loaded[f"{OPTIMIZER}{name}.{k}"]
            entry[k] = v if spec["shape"] == PARAM_SHAPED else v.reshape(spec["shape"])
        if entry:
            state[index[name]] = entry
    saved_groups = record["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, "
            f"this one {len(optimizer.param_groups)}"
        )
    names = _param_names(model)
    groups = [
        {**saved, "params": [index[names[id(p)]] for p in group["params"]]}
        for saved, group in zip(saved_groups, optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
