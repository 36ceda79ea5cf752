"""Activation recompute (``train.recompute``): keep less for backward, run it again there.

* ``none``: every activation a layer needs for its backward is kept.
* ``gau`` (selective): the attention part of each SeqBoat layer (compress, channel gather,
  the GAU with its halo and dispatch, extract, gate) keeps only its inputs (the EMA output
  ``m``, the gate and the routing decision) and runs again in backward. The EMA, projection
  and router activations are kept.
* ``layer`` (full): each layer keeps only its input and runs again in backward.

The recompute goes through megatron-core's ``tensor_parallel.checkpoint``: it saves the CPU,
CUDA and model-parallel RNG tracker states before the first pass and restores them for the
second, so every dropout (replicated regions on the default generator, split regions on the
tracker's per-rank stream) draws the forward's masks again. On top of it, ``checkpoint``
here re-enters the forward's autocast (megatron-core does not use torch autocast; our bf16
runs do), and the layer hands the forward's routing decision to the recompute
(``RecordedPass``): the same activated tokens, hence the same compressed shapes, halo
exchange and dispatch plan on every rank, and layer statistics recorded once, in the first
pass. The recomputed collectives (channel gather, halo all-gather, dispatch all-to-all,
routing broadcast) run in backward in the same order on every rank of their group, because
every rank of a group runs the same graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from parallel import cpu_compat

MODES = ("none", "gau", "layer")


def set_recompute(model: nn.Module, mode: str) -> int:
    """Sets the recompute ``mode`` on every layer of ``model`` that supports it (those with
    a ``recompute`` attribute: the SeqBoat layers). Returns how many layers it set."""
    if mode not in MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {', '.join(MODES)}")
    layers = [m for m in model.modules() if hasattr(m, "recompute")]
    for layer in layers:
        layer.recompute = mode
    return len(layers)


class RecordedPass:
    """What the first (forward) pass of a recomputed region leaves for its recompute: the
    routing decision and the statistics. ``first`` is True until the first pass ends."""

    def __init__(self) -> None:
        self.first = True
        self.activated: Tensor | None = None
        self.stats: Any = None


def checkpoint(function: Callable[..., Tensor], *args: Tensor | None) -> Tensor:
    """``function(*args)``, keeping only ``args`` for backward: megatron-core's
    ``tensor_parallel.checkpoint`` (RNG states replayed), run under the autocast state of
    the forward in both passes. ``args`` are tensors or None; ``function`` returns one
    tensor."""
    cpu_compat.install()  # megatron-core reads the CUDA RNG state; on a CPU: the CPU one
    from megatron.core.tensor_parallel import checkpoint as megatron_checkpoint

    device = next(a.device.type for a in args if a is not None)
    autocast, dtype = autocast_state(device)

    def run(*inputs: Tensor | None) -> Tensor:
        # The backward runs outside the forward's autocast region: enter it again.
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            return function(*inputs)

    return megatron_checkpoint(run, False, *args)


def autocast_state(device: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device`` here, and its dtype."""
    return torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def same_routing(recomputed: Tensor, recorded: Tensor) -> Tensor:
    """The recorded decision, after checking that the recompute routed the same tokens
    (deterministic kernels give the same logits; a difference would change the compressed
    shapes and the collectives that follow, so it must not go on silently)."""
    if not torch.equal(recomputed, recorded):
        changed = int((recomputed != recorded).sum())
        raise RuntimeError(
            f"activation recompute routed {changed} tokens differently from the forward "
            "(non-deterministic kernels?)"
        )
    return recorded
