"""Validation: loss, perplexity and bits per byte over a fixed set of held-out samples."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.context import SINGLE_CONTEXT, ContextParallel
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
