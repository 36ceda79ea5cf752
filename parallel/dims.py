"""``ParallelDims``: this rank's place in the job, built once and passed down.

Sizes and this rank's coordinates in every dimension (tensor, context, pipeline, data), the
parallel features that change how a split computes (sequence parallelism, attention
dispatch), and, when a process group exists, megatron-core's groups for each dimension.
``ParallelDims.single()`` is the one "no parallelism" value: every size 1, no group.

The model's modules take the narrow views ``dims.tensor`` and ``dims.context`` (a layer needs
its own dimension only); they are projections of this object, never built separately.

megatron-core's rank order is tp-cp-dp-pp (``parallel.topology.RANK_ORDER``): global rank =
tp + tp_size * (cp + cp_size * (dp + dp_size * pp)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallel.context import ContextParallel
from parallel.tensor import TensorParallel
from parallel.world import SINGLE_WORLD, World

# The dimensions that split one model; data parallelism replicates it.
MODEL_SPLIT = ("tp_size", "cp_size", "pp_size")


@dataclass(frozen=True)
class ParallelDims:
    world: World = SINGLE_WORLD
    tp_size: int = 1
    tp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    sequence_parallel: bool = False  # Megatron sequence parallelism (only with tp_size > 1)
    # Where local-attention work is balanced (parallel/dispatch.py): "off", "context", "data".
    dispatch: str = "off"
    backend: str = "gloo"  # the one init_distributed picks (or would pick): "gloo" | "nccl"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        product = self.tp_size * self.cp_size * self.pp_size * self.dp_size
        if product != self.world.world_size:
            raise ValueError(
                f"tensor x context x pipeline x data = {self.tp_size} x {self.cp_size} x "
                f"{self.pp_size} x {self.dp_size} != world size {self.world.world_size}"
            )

    @classmethod
    def single(cls, device: torch.device | None = None) -> ParallelDims:
        """One process, nothing split, no process group needed."""
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        return cls(backend=backend, device=device or torch.device("cpu"))

    @classmethod
    def from_parallel_state(
        cls,
        world: World | None = None,
        *,
        sequence_parallel: bool = False,
        dispatch: str = "off",
        backend: str = "gloo",
        device: torch.device | None = None,
    ) -> ParallelDims:
        """From megatron-core's initialized groups (``parallel.topology.init_distributed``
        calls this; tests that initialize ``parallel_state`` themselves may too)."""
        from megatron.core import parallel_state as mpu

        if world is None:
            rank, size = dist.get_rank(), dist.get_world_size()
            world = World(rank, size, rank, "127.0.0.1", 0, "unknown")
        tp_size = mpu.get_tensor_model_parallel_world_size()
        return cls(
            world=world,
            tp_size=tp_size,
            tp_rank=mpu.get_tensor_model_parallel_rank(),
            cp_size=mpu.get_context_parallel_world_size(),
            cp_rank=mpu.get_context_parallel_rank(),
            pp_size=mpu.get_pipeline_model_parallel_world_size(),
            pp_rank=mpu.get_pipeline_model_parallel_rank(),
            dp_size=mpu.get_data_parallel_world_size(with_context_parallel=False),
            dp_rank=mpu.get_data_parallel_rank(with_context_parallel=False),
            sequence_parallel=sequence_parallel and tp_size > 1,
            dispatch=dispatch,
            backend=backend,
            device=device or torch.device("cpu"),
        )

    # ------------------------------------------------------------------ where this rank is

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one rank that logs, writes metadata and reports."""
        return self.world.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world.world_size > 1

    @property
    def replicas(self) -> int:
        """Copies of this rank's model shard that see different tokens: data x context."""
        return self.dp_size * self.cp_size

    @property
    def replica(self) -> int:
        """This rank's index among those copies."""
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def is_first_stage(self) -> bool:
        """The first pipeline stage: it owns the embedding (a tied head's copy is not)."""
        return self.pp_rank == 0

    @property
    def tensor(self) -> TensorParallel:
        """The tensor-parallel view the model's layers take."""
        return TensorParallel(self.tp_size, self.tp_rank, self.sequence_parallel)

    @property
    def context(self) -> ContextParallel:
        """The context-parallel view the model's layers take."""
        return ContextParallel(self.cp_size, self.cp_rank, self.dispatch)

    def sizes(self) -> dict[str, int]:
        """The split, as checkpoints record it."""
        return {
            "tp_size": self.tp_size, "cp_size": self.cp_size, "dp_size": self.dp_size,
            "pp_size": self.pp_size,
        }  # fmt: skip

    # ------------------------------------------------------------------ megatron-core's groups
    # Only valid when parallel_state is initialized (init_distributed / from_parallel_state).

    def tp_group(self) -> dist.ProcessGroup:
        return _mpu().get_tensor_model_parallel_group()

    def pp_group(self) -> dist.ProcessGroup:
        return _mpu().get_pipeline_model_parallel_group()

    def dp_group(self, with_context: bool = True) -> dist.ProcessGroup:
        """The ranks holding the same model shard: data x context by default (they see
        different tokens of the same model; gradients and losses average over them)."""
        return _mpu().get_data_parallel_group(with_context_parallel=with_context)

    def model_group(self) -> dist.ProcessGroup:
        """The ranks holding one copy of the model, split (tensor x pipeline x context)."""
        return _mpu().get_model_parallel_group()

    def embedding_group(self) -> dist.ProcessGroup:
        """The first and last pipeline stages (a tied embedding's two copies)."""
        return _mpu().get_embedding_group()


def _mpu() -> Any:
    from megatron.core import parallel_state

    return parallel_state


def sizes_text(sizes: dict[str, int], keys: tuple[str, ...] = MODEL_SPLIT) -> str:
    """``"2x1x2"``: the named sizes of a checkpoint's split (absent ones count 1)."""
    return "x".join(str(sizes.get(k, 1)) for k in keys)
