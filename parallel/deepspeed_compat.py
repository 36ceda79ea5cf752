"""DeepSpeed, imported so that it runs on our models and on a CPU.

DeepSpeed 0.19.8 needs three things it does not do itself: ``DS_ACCELERATOR=cpu`` without
CUDA, no JIT-built shared-memory op, and 0-dim parameters (our router temperatures, EMA
scalars) in the two places where it views each parameter as bytes. Each fix is a small
wrapper, applied once, around DeepSpeed's own code; nothing of DeepSpeed is copied.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def import_deepspeed() -> Any:
    """deepspeed, imported so that nothing compiles on a CPU.

    ``DS_ACCELERATOR=cpu`` must be set before the import (without CUDA DeepSpeed would probe
    for other accelerators). Its first process group would JIT-build a shared-memory
    all-reduce op (45-60 s, 1.5 GB): marking that op incompatible makes DeepSpeed use the
    torch.distributed (gloo) collectives. The fused and CPU Adam ops are never built because
    the client's torch optimizer is used.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _patch_scalar_broadcast(deepspeed.runtime.engine.DeepSpeedEngine)
    _patch_scalar_zero_init(deepspeed.zero.Init)
    return deepspeed


def _patch_scalar_broadcast(engine_cls: type) -> None:
    """DeepSpeed 0.19.8 broadcasts each parameter as ``p.data.view(torch.uint8)``, which
    fails for 0-dim parameters (our router temperatures, EMA scalars): they are viewed as
    1-element vectors (same storage) for the duration of the broadcast."""
    original = engine_cls._broadcast_model
    if getattr(original, "_scalars_patched", False):
        return

    def broadcast_model(self: Any) -> None:
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.view(1)
        try:
            original(self)
        finally:
            for p in scalars:
                p.data = p.data.view(())

    broadcast_model._scalars_patched = True  # type: ignore[attr-defined]
    engine_cls._broadcast_model = broadcast_model


def _patch_scalar_zero_init(init_cls: type) -> None:
    """The same ``view(torch.uint8)`` in ZeRO-3's conversion of each parameter: for a 0-dim
    one, the same steps with the broadcast through a 1-element view."""
    original = init_cls._zero_init_param
    if getattr(original, "_scalars_patched", False):
        return

    def zero_init_param(self: Any, param: nn.Parameter) -> None:
        if param.dim() != 0:
            return original(self, param)
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        dist.broadcast(param.data.view(1), dist.get_global_rank(group, 0), group=group)
        param.partition()

    zero_init_param._scalars_patched = True  # type: ignore[attr-defined]
    init_cls._zero_init_param = zero_init_param
