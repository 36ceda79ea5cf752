"""Numeric precision of a run: the master dtype of the weights and the autocast around
forward passes (training, evaluation and pipeline stages alike)."""

from __future__ import annotations

import contextlib

import torch

# train.precision -> the dtype weights are kept in: bf16 runs keep fp32 weights and autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp64": torch.float64}


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
