"""Builds what a run is made of from its config: the parallel context, device, tokenizer,
model (this rank's chunks), optimizer, schedule and the DeepSpeed engine. Shared by
training, evaluation, generation and plotting."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from data.tokenizer import Tokenizer, build_tokenizer
from parallel.dims import ParallelDims
from parallel.grads import OverlappedGradReduce
from parallel.materialize import draw_seed
from parallel.pipeline import PipelinePlace
from parallel.world import World
from pretrain.config import Config, ConfigError, OptimizerConfig, micro_batches_per_step
from pretrain.model.lm import LanguageModel
from pretrain.precision import DTYPES

if TYPE_CHECKING:
    from parallel.zero import ZeroEngine


def select_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def parallel_dims_for(cfg: Config, world: World) -> ParallelDims:
    """This process's ``ParallelDims``: megatron-core's groups when the run needs any (more
    than one process, a model split, or ZeRO, which needs a group even of one), else the
    single-process value without a group. Model-parallel sizes on too few processes fail in
    ``init_distributed``'s check, before any collective."""
    from parallel.topology import ParallelSizes, init_distributed

    p = cfg.parallel
    sizes = ParallelSizes(tensor=p.tensor, pipeline=p.pipeline, context=p.context)
    if world.world_size > 1 or cfg.optimizer.zero_stage or sizes.model_parallel > 1:
        return init_distributed(
            sizes, world, timeout_s=cfg.train.timeout_s, sequence_parallel=p.sequence_parallel,
            dispatch=p.dispatch,
        )  # fmt: skip
    return ParallelDims.single(select_device(cfg))


def tokenizer_for(cfg: Config) -> Tokenizer:
    return build_tokenizer(cfg.data.tokenizer, cfg.data.sources)


def pipeline_place_for(cfg: Config, dims: ParallelDims) -> PipelinePlace:
    """The model chunks this rank runs (one per virtual stage; the whole model without a
    pipeline). Checks that a step's micro-batches fit the schedule."""
    micro_batches_per_step(cfg, dims.dp_size)
    p = cfg.parallel
    virtual = p.virtual_stages if dims.pp_size > 1 else 1
    layers = cfg.model.layers
    return PipelinePlace.build(layers, dims.pp_size, dims.pp_rank, virtual, p.stage_layers)


def model_for(cfg: Config, vocab_size: int, device: torch.device) -> LanguageModel:
    """The single-process model in its master precision (bf16 runs keep fp32 weights and
    autocast)."""
    return model_chunks_for(cfg, vocab_size, device)[0]


def model_chunks_for(
    cfg: Config,
    vocab_size: int,
    device: torch.device,
    dims: ParallelDims | None = None,
    place: PipelinePlace | None = None,
) -> list[LanguageModel]:
    """This rank's model chunks: one per stage of ``place`` (pipeline parallelism; several
    with virtual stages), else the one model. Each chunk materializes only its shards of
    the single-process model of one seed, drawn once from the default stream (seeded alike
    on every rank; ``LanguageModel``, parallel/materialize.py), so a parallel run starts from
    exactly the weights of one process and no rank ever holds the whole model."""
    dims = dims or ParallelDims.single()
    stages = place.stages if place is not None and place.active else [None]
    seed = draw_seed()  # one seed for all chunks: they are parts of one model
    with torch.device(device):  # shards go straight to the device, one at a time
        chunks = [
            LanguageModel(cfg.model, vocab_size, dims.tensor, dims.context, stage, seed=seed)
            for stage in stages
        ]
    return [c.to(dtype=DTYPES[cfg.train.precision]) for c in chunks]


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
    """Linear warmup from 0 to ``lr``, then cosine or linear decay to ``min_lr`` over the
    rest of the run; or (``wsd``) ``lr`` until ``wsd_decay_start``, then the decay shape to
    ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    start = wsd_decay_start(cfg, max_steps) if cfg.decay == "wsd" else cfg.warmup_steps
    if step < start:
        return cfg.lr
    progress = min(1.0, (step - start) / max(1, max_steps - start))
    shape_name = cfg.decay_shape if cfg.decay == "wsd" else cfg.decay
    if shape_name == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    elif shape_name == "1-sqrt":
        shape = 1 - math.sqrt(progress)
    else:
        shape = 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def wsd_decay_start(cfg: OptimizerConfig, max_steps: int) -> int:
    """The first step of a WSD run's decay: the last ``decay_fraction`` of ``max_steps``
    (never inside the warmup)."""
    return max(cfg.warmup_steps, max_steps - round(cfg.decay_fraction * max_steps))


def scheduler_for(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr
    )


def zero_engine_for(
    cfg: Config,
    dims: ParallelDims,
    chunks: list[LanguageModel],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> ZeroEngine:
    """DeepSpeed ZeRO over the data x context ranks of ``model`` (this rank's ``chunks``
    as one module); it owns gradient reduction, clipping and the optimizer step (our
    schedule stays ours)."""
    from parallel.zero import ZeroEngine, ZeroOptions

    t = cfg.train
    if not torch.distributed.is_initialized():
        raise ConfigError(
            "optimizer.zero_stage needs a process group (init_distributed; `seqboat "
            "train` creates one, also for a single process)"
        )
    if dims.pp_size > 1:  # the schedule accumulates: DeepSpeed sees one batch
        micro, accumulation = t.global_batch_size // dims.dp_size, 1
    else:
        micro = t.micro_batch_size
        accumulation = micro_batches_per_step(cfg, dims.dp_size)
    # A tied head reads the embedding weight outside the embedding's forward.
    tied = [] if model.head is not None else [(model, model.embedding.weight)]
    options = ZeroOptions(
        stage=cfg.optimizer.zero_stage,
        micro_batch_size=micro,
        grad_accum_steps=accumulation,
        clip_grad=cfg.optimizer.clip_grad,
    )
    # Copies this stage holds of a weight another stage owns: counted once in the norm.
    copies = [] if dims.is_first_stage else [w for c in chunks for w in c.tied_weights()]
    return ZeroEngine.build(
        model, optimizer, scheduler, options, dims, external_params=tied, stage_copies=copies
    )


def shared_tokenizer(cfg: Config, dims: ParallelDims) -> Tokenizer:
    """Rank 0 trains a missing tokenizer; the others wait and load it."""
    tokenizer = tokenizer_for(cfg) if dims.is_main else None
    if dims.distributed:
        torch.distributed.barrier()
    return tokenizer if tokenizer is not None else tokenizer_for(cfg)


def overlapped_reduce_for(
    cfg: Config, dims: ParallelDims, model: nn.Module
) -> OverlappedGradReduce | None:
    """The bucketed data-parallel reduction during the last backward, where it applies: more
    than one data x context rank, our own optimizer (ZeRO reduces itself) and no pipeline
    (megatron-core's schedule runs the backward passes)."""
    p = cfg.parallel
    if not p.overlap_grad_reduce or dims.replicas == 1 or dims.pp_size > 1:
        return None
    return OverlappedGradReduce(
        list(model.parameters()), dims.dp_group(), dims.replicas, dims.sequence_parallel,
        bucket_bytes=int(p.grad_bucket_mb * 2**20),
    )  # fmt: skip
