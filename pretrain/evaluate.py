"""Validation: loss, perplexity and bits per byte over a fixed set of held-out samples."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

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
) -> dict[str, float]:
    """samples: [N, L+1] token ids. Bits per byte divide the summed loss by the UTF-8 bytes
    the target tokens decode to, so it compares across tokenizers."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, tokens, nbytes = 0.0, 0, 0
    for batch in samples.split(micro_batch_size):
        batch = batch.to(device)
        with autocast_for(precision, device):
            losses, _ = model.token_losses(batch)
        nats += float(losses.double().sum())
        tokens += batch[:, 1:].numel()
        nbytes += int(token_bytes[batch[:, 1:].cpu()].sum())
    model.train(was_training)
    loss = nats / max(tokens, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": nats / (math.log(2) * max(nbytes, 1)),
    }
