"""Whole-state views of a DeepSpeed ZeRO engine, for tests and benchmarks (not for the loop):
the bytes of optimizer state a rank holds, and the full optimizer state gathered."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.zero import ZeroEngine


def optimizer_state_bytes(zero: ZeroEngine) -> int:
    """Bytes of optimizer state this rank holds: the optimizer's own state (Adam's
    moments) and the fp32 master copies DeepSpeed keeps, excluding model parameters."""
    opt = zero.engine.optimizer
    base = getattr(opt, "optimizer", opt)
    tensors = [t for s in base.state.values() for t in s.values() if torch.is_tensor(t)]
    tensors += list(_master_tensors(opt))
    model_storage = {_storage(p) for p in zero.module.parameters()}
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = _storage(t)
        if key in seen or key in model_storage:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def full_optimizer_state(zero: ZeroEngine) -> dict[str, dict[str, Tensor]]:
    """``{parameter name: {"fp32": master, "exp_avg": .., "exp_avg_sq": ..}}``, whole
    (collective over data parallel)."""
    names = {id(p): n for n, p in zero.module.named_parameters()}
    if zero.stage == 3:
        return _full_state_stage3(zero.module)
    return _full_state_stage12(zero.engine.optimizer, names)


ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _full_state_stage12(opt: Any, names: dict[int, str]) -> dict[str, dict[str, Tensor]]:
    """ZeRO-1/2 keep, per parameter group, one flat fp32 vector (the group's parameters in
    order, padded) split evenly over the data-parallel ranks: gather it and cut it up.
    (DeepSpeed's ``safe_get_full_optimizer_state`` skips its all-reduce on ranks that hold
    no piece of a parameter, so ranks disagree and hang.)"""
    group = opt.dp_process_group
    out: dict[str, dict[str, Tensor]] = {}
    for i, params in enumerate(opt.round_robin_bit16_groups):
        master = opt.single_partition_of_fp32_groups[i]
        state = opt.optimizer.state[master]
        flats = {"fp32": master, **{k: state[k] for k in ADAM_KEYS}}
        for key, part in flats.items():
            parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, part.detach().contiguous(), group=group)
            flat = torch.cat(parts)
            offset = 0
            for p in params:
                piece = flat[offset : offset + p.numel()].view_as(p).clone()
                out.setdefault(names[id(p)], {})[key] = piece
                offset += p.numel()
    return out


def _full_state_stage3(module: nn.Module) -> dict[str, dict[str, Tensor]]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {
        name: {
            "fp32": safe_get_full_fp32_param(p).clone(),
            **{k: safe_get_full_optimizer_state(p, k).clone() for k in ADAM_KEYS},
        }
        for name, p in module.named_parameters()
    }


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _master_tensors(opt: Any) -> Iterable[Tensor]:
    """The fp32 master partitions of a ZeRO-1/2, ZeRO-3 or (bf16 ZeRO-1) BF16 optimizer."""
    names = (
        "single_partition_of_fp32_groups",
        "fp32_partitioned_groups_flat",
        "fp32_groups_flat_partition",
    )
    for name in names:
        for t in getattr(opt, name, None) or []:
            if torch.is_tensor(t):
                yield t
