"""Validation: loss, perplexity and bits per byte over a fixed set of held-out samples."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.context import SINGLE_CONTEXT, ContextParallel
from parallel.pipeline import PipelinePlace, broadcast_loss, pipeline_step
from pretrain.model.layer import LayerStats
from pretrain.model.lm import LanguageModel


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    samples: Tensor,
    token_bytes: Tensor,
    micro_batch_size: int,
    precision: str = "fp32",
    dp_group: dist.ProcessGroup | None = None,
    cp: ContextParallel = SINGLE_CONTEXT,
) -> dict[str, float]:
    """samples: [N, L+1] token ids (this data-parallel rank's share, cut to this rank's
    chunk under context parallelism; sums are reduced over ``dp_group``). Bits per byte
    divide the summed loss by the UTF-8 bytes the target tokens decode to, so it compares
    across tokenizers."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, tokens, nbytes = 0.0, 0, 0
    for batch in samples.split(micro_batch_size):
        batch = cp.chunk(batch).to(device)
        with autocast_for(precision, device):
            losses, _ = model.token_losses(batch)
        nats += float(losses.double().sum())
        tokens += batch[:, 1:].numel()
        nbytes += int(token_bytes[batch[:, 1:].cpu()].sum())
    model.train(was_training)
    return _metrics(nats, tokens, nbytes, dp_group, device)


@torch.no_grad()
def evaluate_pipeline(
    chunks: list[LanguageModel],
    place: PipelinePlace,
    samples: Tensor,
    token_bytes: Tensor,
    micro_batch_size: int,
    precision: str = "fp32",
    dp_group: dist.ProcessGroup | None = None,
    cp: ContextParallel = SINGLE_CONTEXT,
    sequence_parallel: bool = False,
) -> dict[str, float]:
    """``evaluate`` for a pipeline-parallel model: a forward-only schedule over equal
    micro-batches (the last stage's mean loss, shared with every stage)."""
    device = next(chunks[0].parameters()).device
    size = micro_batch_size if len(samples) % micro_batch_size == 0 else 1
    batches = [cp.chunk(b).to(device) for b in samples.split(size)]
    was_training = chunks[0].training
    for chunk in chunks:
        chunk.eval()
    dtype = next(chunks[0].parameters()).dtype
    with autocast_for(precision, device):
        mean = pipeline_step(
            chunks, place, batches, stage_forward(dtype), seq_length=samples.shape[1] - 1,
            micro_batch_size=size, hidden_size=chunks[0].cfg.width, dtype=dtype,
            sequence_parallel=sequence_parallel, forward_only=True,
        )  # fmt: skip
    for chunk in chunks:
        chunk.train(was_training)
    tokens = sum(b[:, 1:].numel() for b in batches)
    nats = float(broadcast_loss(mean, place, device)) * tokens
    nbytes = sum(int(token_bytes[b[:, 1:].cpu()].sum()) for b in batches)
    return _metrics(nats, tokens, nbytes, dp_group, device)


def stage_forward(
    dtype: torch.dtype, stats: dict[int, list[LayerStats]] | None = None
) -> Callable[[nn.Module, Tensor], Tensor]:
    """The ``step_fn`` of ``pipeline_step``: a chunk's loss on the last stage, else its
    activation in ``dtype`` (the master dtype: under bf16 autocast a stage's output dtype
    depends on its last op, and the next stage's receive buffer must know it beforehand).
    With ``stats``, each chunk's layer statistics of its first micro-batch go there, keyed
    by the chunk's first global layer."""

    def run(chunk: nn.Module, micro_batch: Tensor) -> Tensor:
        first_layer = chunk.stage.layers.start
        collect = stats is not None and first_layer not in stats
        out, chunk_stats = chunk.pipeline_forward(micro_batch, collect)
        if collect:
            stats[first_layer] = chunk_stats or []
        return out if chunk.stage.last else out.to(dtype)

    return run


def _metrics(
    nats: float, tokens: int, nbytes: int, dp_group: dist.ProcessGroup | None, device: torch.device
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of summed nats over summed tokens and bytes
    (summed over ``dp_group``)."""
    if dp_group is not None:
        totals = torch.tensor([nats, tokens, nbytes], dtype=torch.float64, device=device)
        dist.all_reduce(totals, group=dp_group)
        nats, tokens, nbytes = totals.tolist()
    loss = nats / max(tokens, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": nats / (math.log(2) * max(nbytes, 1)),
    }
