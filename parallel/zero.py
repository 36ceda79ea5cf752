"""DeepSpeed ZeRO optimizer sharding over megatron-core's data-parallel groups.

``ZeroEngine.build`` wraps a model, a torch optimizer and our LambdaLR schedule in a
DeepSpeed engine whose config is generated here (``deepspeed_config``), never written by
hand. Its API is the Trainer's step, with the meaning our loop gives each part:

* ``backward(loss)`` per micro-batch: ``loss`` is that micro-batch's mean; the engine divides
  it by the accumulation steps, so the accumulated gradient is the mean over micro-batches.
  Gradients are averaged over the data-parallel ranks (data x context, see ``MegatronGroups``).
* ``step()`` once per global batch: reduces (ZeRO-1) or finalizes (ZeRO-2/3) the gradients,
  clips to ``clip_grad`` (the whole model's norm, tensor-parallel shards counted once), steps
  the optimizer unless the norm (or the loss, ``skip=True``) is non-finite, and steps the
  schedule either way; returns the norm before clipping.
* ``step()`` after gradients produced outside DeepSpeed (megatron-core's pipeline schedules
  call ``torch.autograd.backward`` themselves): the same call; ZeRO-1 only.
* ``save``/``load``: DeepSpeed's own checkpoint files under a directory and tag we choose;
  ZeRO-1/2 load on a different data-parallel size through DeepSpeed's universal checkpoint.

Tensor-parallel "partial" gradients (``mark_partial_grad`` / sequence-parallel weights, which
``parallel.tensor.sync_partial_grads`` sums after backward in the plain loop) are summed by
tensor hooks instead: ZeRO-2/3 reduce gradients inside backward, and a tensor hook runs before
the gradient is accumulated, hence before DeepSpeed's accumulation hooks see it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.layout import holds_partial_grad

# Bucket sizes in elements. DeepSpeed's default (5e8) is for GPUs; on a CPU a smaller
# bucket bounds the flat gradient buffers without changing any result.
GPU_BUCKET = 500_000_000
CPU_BUCKET = 50_000_000


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


# --------------------------------------------------------------------------- config


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
    averaged over data x context ranks (``data_parallel_group(with_context=True)``), and
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
        if data is None:
            from megatron.core import parallel_state as ps

            data = ps.get_data_parallel_group(with_context_parallel=True)
            model = ps.get_model_parallel_group()
            tensor = ps.get_tensor_model_parallel_group()
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


# --------------------------------------------------------------------------- hooks


def install_partial_grad_hooks(
    model: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool
) -> list[Any]:
    """Tensor hooks that sum partial gradients over the tensor group as they are computed.

    Every tensor-parallel rank runs the same graph, so the hooks fire in the same order on
    each and their all-reduces pair up. Returns the handles (``remove()`` undoes them)."""

    def summed(grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    return [
        p.register_hook(summed)
        for p in model.parameters()
        if p.requires_grad and holds_partial_grad(p, sequence_parallel)
    ]


# --------------------------------------------------------------------------- engine


@dataclass
class StepResult:
    grad_norm: float  # before clipping; inf/nan when the step was skipped for it
    applied: bool  # False: the update was skipped (the schedule still advanced)


class ZeroEngine:
    """One rank's DeepSpeed engine with our step semantics (see the module docstring)."""

    def __init__(self, engine: Any, scheduler: Any, stage: int, hooks: list[Any]) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.stage = stage
        self.hooks = hooks
        self.init_seconds = 0.0

    @classmethod
    def build(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        *,
        stage: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        clip_grad: float,
        precision: str = "fp32",
        groups: MegatronGroups | None = None,
        sequence_parallel: bool = False,
        external_params: Sequence[tuple[nn.Module, nn.Parameter]] = (),
        persistence_threshold: int | None = None,
        local_rank: int = 0,
        stage_copies: Sequence[nn.Parameter] = (),
    ) -> ZeroEngine:
        """The engine over ``model`` (already on its device) and its torch ``optimizer``.

        ``scheduler`` is stepped once per ``step()``, applied or skipped. ``groups``: the
        ``mpu`` (default: megatron-core's). ``external_params``: (module, parameter) pairs,
        a parameter used in ``module``'s forward outside its owner's (ZeRO-3 gathers it
        for the whole of ``module``'s forward), e.g. a tied embedding used by the head.
        ``local_rank``: this process's index on its node. ``stage_copies``: this pipeline
        stage's copies of weights another stage owns (a tied head's embedding on the last
        stage), counted once in the gradient norm.
        """
        deepspeed = import_deepspeed()
        # DeepSpeed insists on LOCAL_RANK, which torchrun sets and srun (SLURM_LOCALID) or a
        # single process do not.
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        for copy in stage_copies:  # DeepSpeed's norm skips pipeline-replicated parameters
            copy.ds_pipe_replicated = True
        groups = groups or MegatronGroups()
        _describe_for_universal(model)
        hooks = []
        if groups.get_tensor_model_parallel_world_size() > 1:
            hooks = install_partial_grad_hooks(model, groups.tensor, sequence_parallel)
        config = deepspeed_config(
            stage, micro_batch_size, grad_accum_steps, groups.get_data_parallel_world_size(),
            clip_grad, precision, on_gpu=next(model.parameters()).is_cuda,
            persistence_threshold=persistence_threshold,
        )  # fmt: skip
        start = time.perf_counter()
        # The schedule stays ours: DeepSpeed would not step it on a skipped update.
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, mpu=groups,
            dist_init_required=False,
        )  # fmt: skip
        for module, param in external_params:
            if stage == 3:
                deepspeed.zero.register_external_parameter(module, param)
        counter = _count_micro_steps_on_direct_calls(engine)
        if counter is not None:
            hooks.append(counter)
        zero = cls(engine, scheduler, stage, hooks)
        zero.init_seconds = time.perf_counter() - start
        return zero

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def dp_size(self) -> int:
        """DeepSpeed's data-parallel size (data x context ranks)."""
        return dist.get_world_size(self.engine.seq_data_parallel_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.engine.seq_data_parallel_group)

    def backward(self, loss: Tensor) -> None:
        """Backward of one micro-batch's mean loss (scaled by 1 / accumulation steps)."""
        self.engine.backward(loss)

    def step(self, skip: bool = False) -> StepResult:
        """The optimizer step after the accumulation steps' ``backward`` calls (or after
        gradients produced outside DeepSpeed, ZeRO-1). ``skip``: the loss was non-finite,
        drop this update whatever the gradient. The schedule advances in every case."""
        if skip:
            self._force_skip()
        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        if self.scheduler is not None:
            self.scheduler.step()
        return StepResult(norm if applied or not skip else float("nan"), applied)

    def _force_skip(self) -> None:
        """Makes the next optimizer step see an overflow: DeepSpeed then drops the update and
        clears its gradient buffers itself (the path it takes for a non-finite norm)."""
        opt = self.engine.optimizer
        checker = "check_overflow" if self.stage < 3 else "_overflow_check_and_loss_scale_update"

        def overflow(*args: Any, **kwargs: Any) -> bool:
            opt.overflow = True
            delattr(opt, checker)  # back to the class's method for the next step
            return True

        setattr(opt, checker, overflow)
        if self.stage < 3:
            opt.check_grad_overflow = True

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def gathered(self) -> contextlib.AbstractContextManager:
        """Within it, ZeRO-3's partitioned parameters are whole on every rank (read-only:
        for saving the model); a no-op for stages 1 and 2."""
        if self.stage != 3:
            return contextlib.nullcontext()
        deepspeed = import_deepspeed()
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()))

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    # ------------------------------------------------------------------ memory

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: the optimizer's own state (Adam's
        moments) and the fp32 master copies DeepSpeed keeps, excluding model parameters."""
        opt = self.engine.optimizer
        base = getattr(opt, "optimizer", opt)
        tensors = [t for s in base.state.values() for t in s.values() if torch.is_tensor(t)]
        tensors += list(_master_tensors(opt))
        model_storage = {_storage(p) for p in self.module.parameters()}
        seen: set[int] = set()
        total = 0
        for t in tensors:
            key = _storage(t)
            if key in seen or key in model_storage:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return total

    def full_optimizer_state(self) -> dict[str, dict[str, Tensor]]:
        """``{parameter name: {"fp32": master, "exp_avg": .., "exp_avg_sq": ..}}``, whole
        (collective over data parallel): for checks and conversions, not for the loop."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        if self.stage == 3:
            return _full_state_stage3(self.module)
        return _full_state_stage12(self.engine.optimizer, names)

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str | Path, tag: str, client_state: dict | None = None) -> None:
        """DeepSpeed's files for this step under ``directory/tag`` (collective)."""
        client = dict(client_state or {})
        if self.scheduler is not None:  # ours, not the engine's (see build)
            client["scheduler"] = self.scheduler.state_dict()
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client, save_latest=False)

    def load(self, directory: str | Path, tag: str) -> dict:
        """Restores model, optimizer state and the schedule from ``save``'s files, also when
        they were written at another data-parallel size (ZeRO-1/2: converted once to a
        universal checkpoint beside them). Returns the client state."""
        directory = Path(directory)
        saved_dp = saved_data_parallel_size(directory / tag)
        dp = self.engine.seq_dp_world_size
        if saved_dp != dp and self.stage in (1, 2):
            universal = to_universal(directory, tag)
            return self._load(universal.parent, universal.name, universal=True)
        if saved_dp != dp:
            raise ValueError(
                f"ZeRO-{self.stage}: loading a checkpoint of data-parallel size {saved_dp} on "
                f"{dp} ranks is supported for stages 1 and 2 only"
            )
        return self._load(directory, tag, universal=False)

    def _load(self, directory: Path, tag: str, universal: bool) -> dict:
        # DeepSpeed reads the universal switch from its config at load time.
        self.engine._config.load_universal_checkpoint = universal
        try:
            path, client = self.engine.load_checkpoint(
                str(directory), tag=tag, load_lr_scheduler_states=False
            )
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag} in {directory}")
        client = client or {}
        if self.scheduler is not None and "scheduler" in client:
            self.scheduler.load_state_dict(client["scheduler"])
        return client


def _describe_for_universal(model: nn.Module) -> None:
    """How DeepSpeed's universal-checkpoint conversion merges each parameter's model-parallel
    pieces, from megatron's attributes (saved with every checkpoint): split parameters are
    concatenated along their ``partition_dim`` (0 unless listed as row-parallel), the rest
    are replicated (taken from one rank; without this a 0-dim parameter fails to
    concatenate)."""
    from deepspeed.checkpoint import constants as c

    exact = [
        (f"^{name.replace('.', '[.]')}$", getattr(p, "tensor_model_parallel", False), p)
        for name, p in model.named_parameters()
    ]
    model.universal_checkpoint_info = {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: [n for n, split, _ in exact if not split],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [
            n for n, split, p in exact if split and p.partition_dim == 1
        ],
    }


def _count_micro_steps_on_direct_calls(engine: Any) -> Any:
    """The model may be called directly (``model.loss(...)``, a pipeline schedule) instead of
    through ``engine(...)``. ``engine.forward`` starts each micro-step with
    ``clear_backward_seen_flag``, which for ZeRO-3 advances the micro-step counter (without it
    every backward overwrites the accumulated gradient partitions instead of adding); a
    forward pre-hook on the model does the same on direct calls (a second call is a no-op)."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "clear_backward_seen_flag"):
        return None
    return engine.module.register_forward_pre_hook(
        lambda module, args: optimizer.clear_backward_seen_flag()
    )


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


def saved_data_parallel_size(checkpoint: Path) -> int:
    """The data-parallel size a DeepSpeed checkpoint directory was written with."""
    files = sorted(checkpoint.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} has no DeepSpeed model states")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return int(state["dp_world_size"])


def to_universal(directory: Path, tag: str) -> Path:
    """``directory/tag`` converted to DeepSpeed's universal format in
    ``directory/<tag>_universal`` (once, by global rank 0; every rank waits)."""
    out = directory / f"{tag}_universal"
    if dist.get_rank() == 0 and not (out / "zero").is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = directory / f"{tag}_universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(directory / tag), output_folder=str(tmp),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
            strict=True, inject_missing_state=True,
        )  # fmt: skip
        ds_to_universal.main(args)
        _scalars_as_vectors(tmp / "zero")
        tmp.rename(out)
        (directory / "latest_universal").unlink(missing_ok=True)  # written by main; unused
    dist.barrier()
    return out


def _scalars_as_vectors(folder: Path) -> None:
    """DeepSpeed's universal loader cuts every parameter with ``chunk``, which refuses 0-dim
    tensors: the converted 0-dim parameters (and their moments) are stored as 1-element
    vectors (the loader flattens each piece anyway)."""
    for path in folder.glob("*/*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        value = state.get("param") if isinstance(state, dict) else None
        if torch.is_tensor(value) and value.dim() == 0:
            state["param"] = value.view(1)
            torch.save(state, path)
