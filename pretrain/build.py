"""Builds what a run is made of from its config: device, tokenizer, model, optimizer,
schedule. Shared by training, evaluation, generation and plotting."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from data.tokenizer import Tokenizer, build_tokenizer
from parallel.context import SINGLE_CONTEXT, ContextParallel
from parallel.pipeline import PipelinePlace
from parallel.sharding import Place, load_model, model_sharded_state_dict
from parallel.tensor import SINGLE, TensorParallel, shard_state_dict
from pretrain.checkpoint import (
    SHARDED,
    complete_checkpoints,
    load_rank_file,
    load_sharded,
    read_meta,
    verify_files,
)
from pretrain.config import Config, OptimizerConfig, config_from_dict, parse_yaml
from pretrain.model.lm import LanguageModel

DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp64": torch.float64}


def select_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def tokenizer_for(cfg: Config) -> Tokenizer:
    return build_tokenizer(cfg.data.tokenizer, cfg.data.sources)


def model_for(
    cfg: Config,
    vocab_size: int,
    device: torch.device,
    tp: TensorParallel = SINGLE,
    cp: ContextParallel = SINGLE_CONTEXT,
) -> LanguageModel:
    """The model in its master precision (bf16 runs keep fp32 weights and autocast).

    Under model parallelism every rank builds the single-process model from the same seed
    and keeps its shard, so a parallel run starts from exactly the weights of one process.
    """
    return model_chunks_for(cfg, vocab_size, device, tp, cp)[0]


def model_chunks_for(
    cfg: Config,
    vocab_size: int,
    device: torch.device,
    tp: TensorParallel = SINGLE,
    cp: ContextParallel = SINGLE_CONTEXT,
    place: PipelinePlace | None = None,
) -> list[LanguageModel]:
    """This rank's model chunks: one per stage of ``place`` (pipeline parallelism; several
    with virtual stages), else the one model. Each holds its shard of the single-process
    model built from the seed, keyed like it (``shard_state_dict`` takes the keys it has)."""
    model = LanguageModel(cfg.model, vocab_size)
    pipelined = place is not None and place.active
    if tp.active or cp.active or pipelined:
        full = model.state_dict()
        stages = place.stages if pipelined else [None]
        chunks = [LanguageModel(cfg.model, vocab_size, tp, cp, stage) for stage in stages]
        for chunk in chunks:
            chunk.load_state_dict(shard_state_dict(full, chunk, tp))
    else:
        chunks = [model]
    return [c.to(device=device, dtype=DTYPES[cfg.train.precision]) for c in chunks]


def optimizer_for(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or RAdam; weight decay on matrices only (not on biases, norms, scalars)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.name == "radam":
        return torch.optim.RAdam(groups, decoupled_weight_decay=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Linear warmup from 0 to ``lr``, then cosine or linear decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def scheduler_for(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr
    )


def load_trained(run_dir: Path, device: torch.device | None = None):
    """(config, tokenizer, single-process model with the newest checkpoint's weights, step)
    of a run, whatever the split that trained it (the sharded tensors load whole)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config_from_dict(parse_yaml(config_path.read_text()))
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    ckpt = checkpoints[-1]
    meta = read_meta(ckpt)
    verify_files(ckpt, meta)
    first = load_rank_file(ckpt, 0, meta)
    device = device or select_device(cfg)
    tokenizer = tokenizer_for(cfg)
    model = model_for(cfg, tokenizer.vocab_size, torch.device("cpu"))
    load_model(model, load_sharded(ckpt / SHARDED, model_sharded_state_dict(model, Place(), True)))
    return cfg, tokenizer, model.to(device), int(first["train"]["step"])
