"""Random number streams of a run, in one place: seeding and checkpointed state.

Every rank seeds the same stream before building the model (the same initial weights
everywhere), then its dropout stream: one per (data, context) rank, i.e. per slice of tokens,
shared by the tensor-parallel ranks (replicated regions draw the same masks); megatron-core's
RNG tracker adds one stream per tensor-parallel rank for the split regions.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from parallel.dims import ParallelDims


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def seed_dropout_streams(seed: int, dims: ParallelDims) -> None:
    """This rank's dropout streams (see the module docstring)."""
    stream = seed + 100 * dims.replica
    seed_everything(stream)
    if dims.tp_size > 1:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(stream)


def rng_state(dims: ParallelDims) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if dims.tp_size > 1:  # megatron-core's per-tensor-rank dropout stream
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tracker" in state:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])
