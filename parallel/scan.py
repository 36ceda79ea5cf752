"""Context (sequence) parallelism for the SSM: passing EMA states between sequence chunks.

Rank r of a context-parallel group of size P holds tokens [r*Lc, (r+1)*Lc) of every sequence
(all chunks the same length Lc). A linear recurrence h_t = b x_t + q h_{t-1} splits exactly:
each rank scans its chunk from a zero state, giving its outputs y_r and final state f_r; the
state entering rank r is then

    h_in(r) = sum_{j<r} Q^(r-1-j) f_j,   Q = q^Lc,

and the exact outputs are y_r plus that state's response over the chunk: state passing, not an
all-to-all of activations.

Communication is one all-gather of the [B, C, N] final states in the forward pass and its
reduce-scatter in the backward pass: O(P*B*C*N) per call, independent of the sequence length.
Every rank combines the gathered states itself (P is small), so there is no second collective
and no sequential ring of P-1 point-to-point hops. The backward pass is the same scan in
reverse: rank j's final state receives sum_{r>j} Q^(r-1-j) dL/dh_in(r), which is exactly the
sum over ranks that megatron-core's reduce-scatter forms.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor


class ChunkScan(Protocol):
    """The part of ``pretrain.model.ema.DampedEMA`` that context parallelism needs."""

    def scan_chunk(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def state_response(self, state: Tensor, length: int) -> Tensor: ...

    def chunk_decay(self, length: int, dtype: torch.dtype) -> Tensor: ...

    def compute_dtype(self, x: Tensor) -> torch.dtype: ...


def carried_state(final: Tensor, chunk_decay: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The state entering this rank's chunk: sum_{j<r} Q^(r-1-j) final_j (zeros on rank 0).

    Args:
        final: this rank's final state after scanning its chunk from a zero state, [B, C, N].
            B, C, N, dtype and device must agree on all ranks of ``group``.
        chunk_decay: Q = q^Lc, [C, N] (or broadcastable to it): how much of a state survives
            one chunk. Must be the same on all ranks (all chunks have the same length Lc).
        group: the context-parallel group, ranks in sequence order.

    Returns:
        h_in for this rank, [B, C, N], in ``final``'s dtype.

    Collective: every rank of ``group`` must call this, and must later run backward through
    the result (its backward is a reduce-scatter over ``group``), even a rank whose h_in is
    zero.

    Gradients:
        * ``final``: exact. The forward all-gather's backward sums, over all ranks of the
          group, what each rank's h_in contributed to its loss, so rank j's ``final``
          receives the gradient of the *sum of all ranks' losses* with respect to it.
        * ``chunk_decay``: partial. Each rank differentiates only its own h_in with respect
          to Q (the gathered states are constants here; their dependence on the parameters
          is differentiated on the rank that produced them). Parameters replicated over the
          group (the EMA's, from which Q and the chunk scans derive) therefore hold on each
          rank a partial gradient; summing those gradients over the context-parallel group
          gives the full gradient of the sum of the ranks' losses (averaging gives that of
          their mean, the usual objective when each rank normalizes its loss by its own
          token count). The caller all-reduces them over the group, as data parallelism
          does over its group; the two compose into one all-reduce over megatron-core's
          ``get_data_parallel_group(with_context_parallel=True)``.
    """
    size = dist.get_world_size(group=group)
    if size == 1:
        return torch.zeros_like(final)
    rank = dist.get_rank(group=group)
    if final.dim() != 3:
        raise ValueError(f"final must be [B, C, N], got shape {tuple(final.shape)}")
    decay = chunk_decay.to(final.dtype)

    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    # [P, B, C, N] on every rank; backward reduce-scatters (sums) the gradients back to the
    # rank that produced each state.
    states = gather_from_sequence_parallel_region(
        final.unsqueeze(0), tensor_parallel_output_grad=True, group=group
    )
    # weights[j] = Q^(r-1-j) for j < r, else 0. Powers by repeated products (no log/pow:
    # exact at Q = 0 and for its gradient). Every gathered state enters the sum, also the
    # zero-weighted ones, so that every rank's graph reaches the gather and every rank issues
    # the backward reduce-scatter (rank 0 included).
    powers = [torch.ones_like(decay)]
    for _ in range(rank - 1):
        powers.append(powers[-1] * decay)
    zero = torch.zeros_like(decay)
    weights = torch.stack([powers[rank - 1 - j] if j < rank else zero for j in range(size)])
    weights = weights.expand(size, *final.shape[1:])
    return torch.einsum("pcn,pbcn->bcn", weights, states)


def context_parallel_ema(ema: ChunkScan, x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The EMA over this rank's chunk of a sequence split across ``group``, exactly.

    x: [Lc, B, C], this rank's tokens (rank r of the group holds [r*Lc, (r+1)*Lc); Lc the
    same on every rank). Returns y [Lc, B, C] in x's dtype: this rank's slice of the
    single-process ``ema(x_full)``. Collective over ``group`` in forward and backward; the
    gradients of the EMA's parameters are partial per rank (see ``carried_state``) and must be
    summed over the group.
    """
    length = x.shape[0]
    dtype = ema.compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # float32 at least, as ema.py
        y, final = ema.scan_chunk(x)
        carried = carried_state(final.to(dtype), ema.chunk_decay(length, dtype), group)
        # Summed in the compute dtype: the carried part is not rounded to a low-precision x
        # dtype before it is added.
        return (y.to(dtype) + ema.state_response(carried, length)).to(x.dtype)
