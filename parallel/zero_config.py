"""DeepSpeed's side of a ZeRO run: its config, generated from ours (never written by hand),
and ``MegatronGroups``, the ``mpu`` through which it sees megatron-core's process groups."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from parallel.dims import ParallelDims

# Bucket sizes in elements. DeepSpeed's default (5e8) is for GPUs; on a CPU a smaller
# bucket bounds the flat gradient buffers without changing any result.
GPU_BUCKET = 500_000_000
CPU_BUCKET = 50_000_000


def deepspeed_config(
    stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    dp_size: int,
    clip_grad: float,
    precision: str = "fp32",
    on_gpu: bool | None = None,
    persistence_threshold: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for one run, from plain numbers.

    ``micro_batch_size`` is per data-parallel rank; ``dp_size`` the data-parallel size as
    DeepSpeed sees it (data x context ranks), so ``train_batch_size`` is bookkeeping only.
    ``clip_grad``: the maximum global gradient norm, 0 = no clipping (the norm is still
    computed: it is logged and decides skipped steps). ``precision``: "fp32" keeps fp32
    weights (our train.precision=bf16 is fp32 weights + autocast, i.e. "fp32" here); "bf16"
    is DeepSpeed's bf16 mode (bf16 weights, fp32 master copies and moments in the optimizer).
    ``persistence_threshold``: ZeRO-3 keeps parameters smaller than this whole on every rank
    (DeepSpeed's default 1e5 when None; 0 partitions every parameter).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, not {stage}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    bucket = GPU_BUCKET if on_gpu else CPU_BUCKET
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        # Overlap needs CUDA streams (gloo on a CPU runs collectives synchronously anyway),
        # and DeepSpeed allows it with our caller-owned accumulation for stage 2 only.
        "overlap_comm": bool(on_gpu and stage == 2),
    }
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket // 10
        if persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = persistence_threshold
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * dp_size,
        # Our loop owns the accumulation boundary: N backward calls, then one step().
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(clip_grad),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # The client optimizer is a torch one (no fused/CPU Adam builds).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


# --------------------------------------------------------------------------- groups


class MegatronGroups:
    """DeepSpeed's ``mpu`` over megatron-core's groups (or explicit ones, for tests).

    Data parallel, for DeepSpeed, is megatron's data-parallel group *with* the context-
    parallel ranks: those ranks hold the same model and different tokens, our gradients are
    averaged over data x context ranks (``ParallelDims.dp_group()``), and
    sharding the optimizer over them divides its memory by that size too (as megatron's
    distributed optimizer does). Model parallel is megatron's model-parallel group (tensor x
    pipeline); with context in the data group, the two partition the world. DeepSpeed's own
    (Ulysses) sequence-parallel functions are deliberately absent.
    """

    def __init__(
        self,
        data: dist.ProcessGroup | None = None,
        model: dist.ProcessGroup | None = None,
        tensor: dist.ProcessGroup | None = None,
    ) -> None:
        if data is None:  # megatron-core's, as this rank's ParallelDims names them
            dims = ParallelDims.from_parallel_state()
            data, model, tensor = dims.dp_group(), dims.model_group(), dims.tp_group()
        self.data, self.model, self.tensor = data, model, tensor

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.data

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.data)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.data)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.data)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.model

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.model)

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.model)

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tensor

    def get_tensor_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.tensor)

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tensor)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self.tensor)[0]
