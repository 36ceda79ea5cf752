"""DeepSpeed's universal checkpoint: how a ZeRO-1/2 run's files, written at one data-parallel
size, load at another. DeepSpeed converts (``ds_to_universal``); this module tells it how our
parameters split (from megatron-core's attributes) and fixes up what it cannot take (0-dim
parameters)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def describe_for_universal(model: nn.Module) -> None:
    """How DeepSpeed's universal-checkpoint conversion merges each parameter's model-parallel
    pieces, from megatron's attributes (saved with every checkpoint): split parameters are
    concatenated along their ``partition_dim`` (0 unless listed as row-parallel), the rest
    are replicated (taken from one rank; without this a 0-dim parameter fails to
    concatenate)."""
    from deepspeed.checkpoint import constants as c

    exact = [
        (f"^{name.replace('.', '[.]')}$", getattr(p, "tensor_model_parallel", False), p)
        for name, p in model.named_parameters()
    ]
    model.universal_checkpoint_info = {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: [n for n, split, _ in exact if not split],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [
            n for n, split, p in exact if split and p.partition_dim == 1
        ],
    }


def saved_data_parallel_size(checkpoint: Path) -> int:
    """The data-parallel size a DeepSpeed checkpoint directory was written with."""
    files = sorted(checkpoint.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} has no DeepSpeed model states")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return int(state["dp_world_size"])


def to_universal(directory: Path, tag: str) -> Path:
    """``directory/tag`` converted to DeepSpeed's universal format in
    ``directory/<tag>_universal`` (once, by global rank 0; every rank waits)."""
    out = directory / f"{tag}_universal"
    if dist.get_rank() == 0 and not (out / "zero").is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = directory / f"{tag}_universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(directory / tag), output_folder=str(tmp),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
            strict=True, inject_missing_state=True,
        )  # fmt: skip
        ds_to_universal.main(args)
        _scalars_as_vectors(tmp / "zero")
        tmp.rename(out)
        (directory / "latest_universal").unlink(missing_ok=True)  # written by main; unused
    dist.barrier()
    return out


def _scalars_as_vectors(folder: Path) -> None:
    """DeepSpeed's universal loader cuts every parameter with ``chunk``, which refuses 0-dim
    tensors: the converted 0-dim parameters (and their moments) are stored as 1-element
    vectors (the loader flattens each piece anyway)."""
    for path in folder.glob("*/*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        value = state.get("param") if isinstance(state, dict) else None
        if torch.is_tensor(value) and value.dim() == 0:
            state["param"] = value.view(1)
            torch.save(state, path)
