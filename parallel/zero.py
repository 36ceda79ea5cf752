"""DeepSpeed ZeRO optimizer sharding over megatron-core's data-parallel groups.

``ZeroEngine.build`` wraps a model, a torch optimizer and our LambdaLR schedule in a
DeepSpeed engine whose config is generated from ours (``parallel/zero_config.py``), never
written by hand. DeepSpeed's import and fixes are ``parallel/deepspeed_compat.py``, its
universal-checkpoint conversion ``parallel/zero_universal.py``.

Its API is the Trainer's step, with the meaning our loop gives each part:

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
``parallel.grads.sum_partial_grads`` sums after backward in the plain loop) are summed by
tensor hooks instead: ZeRO-2/3 reduce gradients inside backward, and a tensor hook runs before
the gradient is accumulated, hence before DeepSpeed's accumulation hooks see it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.deepspeed_compat import import_deepspeed
from parallel.dims import ParallelDims
from parallel.layout import holds_partial_grad
from parallel.zero_config import MegatronGroups, deepspeed_config
from parallel.zero_universal import describe_for_universal, saved_data_parallel_size, to_universal

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


@dataclass(frozen=True)
class ZeroOptions:
    """What DeepSpeed's config is generated from (``parallel.zero_config.deepspeed_config``)."""

    stage: int
    micro_batch_size: int  # per data-parallel rank and backward call
    grad_accum_steps: int
    clip_grad: float  # the global norm; 0 = no clipping
    precision: str = "fp32"
    persistence_threshold: int | None = None  # ZeRO-3; None: DeepSpeed's default


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
        options: ZeroOptions,
        dims: ParallelDims | None = None,
        groups: MegatronGroups | None = None,
        external_params: Sequence[tuple[nn.Module, nn.Parameter]] = (),
        stage_copies: Sequence[nn.Parameter] = (),
    ) -> ZeroEngine:
        """The engine over ``model`` (already on its device) and its torch ``optimizer``.

        ``scheduler`` is stepped once per ``step()``, applied or skipped. ``dims``: this
        rank's place (sequence parallelism, local rank; default one process). ``groups``: the
        ``mpu`` (default: megatron-core's groups). ``external_params``: (module, parameter)
        pairs, a parameter used in ``module``'s forward outside its owner's (ZeRO-3 gathers
        it for the whole of ``module``'s forward), e.g. a tied embedding used by the head.
        ``stage_copies``: this pipeline stage's copies of weights another stage owns (a tied
        head's embedding on the last stage), counted once in the gradient norm.
        """
        dims = dims or ParallelDims.single()
        deepspeed = import_deepspeed()
        # DeepSpeed insists on LOCAL_RANK, which torchrun sets and srun (SLURM_LOCALID) or a
        # single process do not.
        os.environ.setdefault("LOCAL_RANK", str(dims.world.local_rank))
        for copy in stage_copies:  # DeepSpeed's norm skips pipeline-replicated parameters
            copy.ds_pipe_replicated = True
        groups = groups or MegatronGroups()
        describe_for_universal(model)
        hooks = []
        if groups.get_tensor_model_parallel_world_size() > 1:
            hooks = install_partial_grad_hooks(model, groups.tensor, dims.sequence_parallel)
        o = options
        config = deepspeed_config(
            o.stage, o.micro_batch_size, o.grad_accum_steps,
            groups.get_data_parallel_world_size(), o.clip_grad, o.precision,
            on_gpu=next(model.parameters()).is_cuda,
            persistence_threshold=o.persistence_threshold,
        )  # fmt: skip
        start = time.perf_counter()
        # The schedule stays ours: DeepSpeed would not step it on a skipped update.
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, mpu=groups,
            dist_init_required=False,
        )  # fmt: skip
        for module, param in external_params:
            if o.stage == 3:
                deepspeed.zero.register_external_parameter(module, param)
        counter = _count_micro_steps_on_direct_calls(engine)
        if counter is not None:
            hooks.append(counter)
        zero = cls(engine, scheduler, o.stage, hooks)
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

    def gathered(self) -> contextlib.AbstractContextManager:
        """Within it, ZeRO-3's partitioned parameters are whole on every rank (read-only:
        for saving the model); a no-op for stages 1 and 2."""
        if self.stage != 3:
            return contextlib.nullcontext()
        deepspeed = import_deepspeed()
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()))

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
