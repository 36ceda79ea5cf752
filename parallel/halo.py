"""Context parallelism for causal local attention: the activated-token halo.

Each rank of a context-parallel group holds a contiguous chunk of every sequence and
compresses its own activated tokens (``pretrain/model/router.py``). Causal local attention
lets activated token i see itself and the previous ``window`` activated tokens
(``pretrain/model/gau.py``), so the first
activated tokens of rank r need the keys and values of the last ``window`` activated tokens
*before* its chunk. With sparse activation those can sit on several earlier ranks (or be
fewer than ``window`` near the start of the sequence).

They are exchanged with fixed-shape collectives only (no shape depends on another rank's routing):

1. every rank contributes its *tail*: its own last min(window, count_b) activated tokens of
   each batch column b, right-aligned in ``window`` slots, zero-padded on the left;
2. the tails and the per-column counts are all-gathered ([cp * window, B, ...] and [cp, B]);
3. rank r picks, for each column, the last ``window`` activated tokens of ranks < r.

Step 3 is exact: the last ``window`` activated tokens before rank r are the concatenation of
suffixes of earlier ranks' activated lists, each of length <= ``window``, and a rank's tail
holds exactly such a suffix. Traffic is O(cp * window * B * width) per call, independent of
the sequence length and of the (data-dependent, per-rank) compressed lengths M_local.

The float gather is megatron-core's ``gather_from_sequence_parallel_region``: its backward
reduce-scatters, so the gradient of each halo token returns to the rank that owns it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def gather_halo(
    tensors: list[Tensor], counts: Tensor, window: int, group: dist.ProcessGroup
) -> tuple[list[Tensor], Tensor]:
    """The last ``window`` activated tokens before this rank's chunk, for each tensor.

    Args:
        tensors: each [M_local, B, ...] in compressed layout (activated tokens left-packed,
            slot j < counts[b] valid), e.g. k [M, B, Z], v [M, B, H], positions [M, B].
            Floating-point tensors are differentiable; integer and bool tensors are not.
            Every rank must pass the same list structure (dtypes and trailing shapes);
            M_local may differ between ranks.
        counts: [B] activated tokens of each sequence on this rank (at most M_local).
        window: the local-attention window w.
        group: the context-parallel group; rank order is chunk order.

    Returns:
        (halo tensors, each [window, B, ...]; valid [window, B] bool). Slot window - 1 holds
        the most recent activated token before the chunk; empty slots (on the left) are
        zero and invalid. On the group's first rank everything is invalid.

    Collective: all ranks of ``group`` must call it together, and the backward must run on
    all of them too (it reduce-scatters), so a rank must not drop the float halo from its
    loss while others use theirs.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if counts.dim() != 1:
        raise ValueError(f"counts must be [B], got shape {tuple(counts.shape)}")
    batch, device = counts.shape[0], counts.device
    for x in tensors:
        if x.dim() < 2 or x.shape[1] != batch or x.shape[0] < 1:
            raise ValueError(f"expected [M >= 1, B={batch}, ...], got {tuple(x.shape)}")
        if x.is_complex():
            raise TypeError("complex tensors are not supported: pass their real view")

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:  # nothing before the only chunk; no communication at all
        halos = [x.new_zeros(window, *x.shape[1:]) for x in tensors]
        return halos, torch.zeros(window, batch, dtype=torch.bool, device=device)

    counts = counts.long()
    slots = torch.arange(window, device=device).unsqueeze(1)  # [w, 1]
    # This rank's tail: tail slot s holds local token count_b - window + s, if it exists.
    tail_index = counts.unsqueeze(0) - window + slots
    tails = [_take_rows(x, tail_index.clamp_min(0), tail_index >= 0) for x in tensors]

    # Integer tensors ride with the counts in one plain all-gather (exact as int64; no grad):
    # the tails do not depend on other ranks' counts, so nothing has to be exchanged first.
    integer = [i for i, t in enumerate(tails) if not t.is_floating_point()]
    meta = torch.cat([counts, *(tails[i].long().reshape(-1) for i in integer)])
    meta_all = meta.new_empty(size * meta.numel())
    dist.all_gather_into_tensor(meta_all, meta, group=group)
    meta_all = meta_all.view(size, -1)
    all_counts = meta_all[:, :batch]  # [cp, B]

    rows, valid = _halo_rows(all_counts, rank, window)
    halos: list[Tensor | None] = [None] * len(tensors)

    offset = batch
    for i in integer:
        shape = tails[i].shape
        numel = tails[i].numel()
        gathered = meta_all[:, offset : offset + numel].reshape(size * window, *shape[1:])
        halos[i] = _take_rows(gathered, rows, valid).to(tails[i].dtype)
        offset += numel

    # Floats: one differentiable gather per dtype, tensors concatenated along a flattened
    # last dim (same [window, B] leading shape by construction).
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tails):
        if t.is_floating_point():
            by_dtype.setdefault(t.dtype, []).append(i)
    for members in by_dtype.values():
        widths = [math.prod(tails[i].shape[2:]) for i in members]
        packed = torch.cat(
            [tails[i].reshape(window, batch, w) for i, w in zip(members, widths, strict=True)], -1
        )
        gathered = _all_gather_tails(packed, group)  # [cp * window, B, F]
        picked = _take_rows(gathered, rows, valid)
        for i, part in zip(members, picked.split(widths, dim=-1), strict=True):
            halos[i] = part.reshape(window, *tails[i].shape[1:])

    return halos, valid  # type: ignore[return-value]


def with_halo(local: Tensor, halo: Tensor) -> Tensor:
    """[halo ; local] along the token axis: [window + M_local, B, ...].

    ``GatedAttentionUnit.local_attention`` cuts the queries into blocks whose keys are the
    block and the ``window`` slots before it, so local query i, at index window + i, sees
    keys window + i - window .. window + i, i.e. halo slots i .. window - 1 and local
    tokens 0 .. i. Because the halo is right-aligned, those halo slots are exactly the
    activated tokens the single-process attention would show it; invalid (empty) halo slots
    are masked through the halo's ``valid``. The queries of the halo slots are padding whose
    outputs are discarded.
    """
    if halo.shape[1:] != local.shape[1:]:
        raise ValueError(f"halo {tuple(halo.shape)} does not match local {tuple(local.shape)}")
    return torch.cat([halo, local], dim=0)


def _halo_rows(all_counts: Tensor, rank: int, window: int) -> tuple[Tensor, Tensor]:
    """Rows of the gathered tails [cp * window, ...] that make this rank's halo, and validity.

    Halo slot s of column b is activated token g = before_b - window + s of that column,
    counted over the whole sequence (before_b: activated tokens on ranks < ``rank``).
    """
    window_slots = torch.arange(window, device=all_counts.device).unsqueeze(1)  # [w, 1]
    ends = all_counts.cumsum(0)  # [cp, B]: one past each rank's last activated token
    before = ends[rank - 1] if rank > 0 else torch.zeros_like(ends[0])
    g = before.unsqueeze(0) - window + window_slots  # [w, B]
    valid = g >= 0
    # Owner of g: the first rank whose list ends after g. Ranks without activated tokens
    # have end == start and are skipped by the strict comparison.
    owner = (ends.unsqueeze(0) <= g.unsqueeze(1)).sum(1)  # [w, B]
    owner = torch.where(valid, owner, torch.zeros_like(owner))
    # g is the (end - g)-th last token of its owner; its tail holds it at window - (end - g),
    # which is in [0, window) since end <= before and g >= before - window.
    tail_slot = window - (ends.gather(0, owner) - g)
    rows = torch.where(valid, owner * window + tail_slot, torch.zeros_like(owner))
    return rows, valid


def _all_gather_tails(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[window, B, F] -> [cp * window, B, F]; backward: reduce-scatter to the owners."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    # tensor_parallel_output_grad: every rank's gradient is partial (it covers only the
    # halo that rank used), so the owner's gradient is the sum over the group.
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)


def _take_rows(x: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """out[i, b] = x[index[i, b], b] where ``valid``, else 0.

    Row-wise index_select on the flattened [T * B, ...] view: its backward is an index_add,
    cheaper than gather's scatter_add. ``where`` (not a multiply) so that a non-finite value
    in a clamped row cannot leak into an empty slot.
    """
    batch = x.shape[1]
    flat = (index * batch + torch.arange(batch, device=x.device)).reshape(-1)
    rows = x.reshape(x.shape[0] * batch, *x.shape[2:]).index_select(0, flat)
    rows = rows.view(*index.shape, *x.shape[2:])
    mask = valid.view(*valid.shape, *([1] * (x.dim() - 2)))
    return torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
