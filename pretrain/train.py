"""The training loop: micro-batches, schedule, clipping, evaluation, checkpoints, logging.

One ``Trainer`` owns one run directory. Running the same config again resumes from the
newest complete checkpoint, restoring model, optimizer, schedule, data position and every
RNG, so the continued loss curve is the one an uninterrupted run would have produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from data.loader import PretrainLoader, validation_samples
from data.tokenizer import Tokenizer
from parallel.context import SINGLE_CONTEXT, ContextParallel
from parallel.data_parallel import average, average_gradients, data_parallel_group
from parallel.pipeline import PipelinePlace, broadcast_loss, pipeline_step, sync_tied_grads
from parallel.sharding import (
    Place,
    load_model,
    load_optimizer,
    model_sharded_state_dict,
    optimizer_record,
    optimizer_sharded_state_dict,
    spread_writes,
)
from parallel.tensor import (
    SINGLE,
    TensorParallel,
    clip_gradients,
    full_state_dict,
    split_layout,
    sync_partial_grads,
)
from parallel.topology import Topology
from pretrain.build import (
    model_chunks_for,
    model_for,
    optimizer_for,
    scheduler_for,
    select_device,
    tokenizer_for,
)
from pretrain.checkpoint import Layout, load_latest, remove_partial, save_checkpoint
from pretrain.config import Config, ConfigError, parse_yaml, save_config
from pretrain.evaluate import autocast_for, evaluate, evaluate_pipeline, stage_forward
from pretrain.flops import training_flops_per_token
from pretrain.model.decode import generate
from pretrain.model.layer import LayerStats
from pretrain.model.lm import StageChunks
from pretrain.monitor import Monitor, new_run_id
from pretrain.plot import save_heatmap
from pretrain.stop import early_stop_requested

if TYPE_CHECKING:
    from parallel.zero import ZeroEngine

# Exit code of a run that saved a checkpoint because it was asked to stop (SIGUSR1 or
# SIGTERM, e.g. Slurm preemption): a launcher reads it as "requeue me".
REQUEUE_EXIT_CODE = 75

# DeepSpeed's files in a checkpoint: <step>/deepspeed/zero/.
ZERO_DIR, ZERO_TAG = "deepspeed", "zero"

# Config sections that must not change when a run resumes: they define the model and the
# data order. Everything else (steps, intervals, logging) may.
FROZEN_ON_RESUME = (
    "model", "data", "train.seq_length", "train.global_batch_size", "train.seed",
    "optimizer.zero_stage",  # where the optimizer state is kept (DeepSpeed's files or ours)
)  # fmt: skip


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after the checkpoint is saved when a stop was requested. The process is
    expected to exit (with REQUEUE_EXIT_CODE): SIGTERM is left ignored."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped on request at step {step}; checkpoint saved")
        self.step = step


@dataclass
class TrainResult:
    step: int
    val: dict[str, float]
    sample: str


class Trainer:
    """One rank's share of a run. ``topology`` comes from ``parallel.topology.init_distributed``
    (tensor x data parallel); without it the run is a single process with no process group."""

    def __init__(
        self, cfg: Config, progress: bool = True, topology: Topology | None = None
    ) -> None:
        self.cfg = cfg
        self.topo = topology or Topology.single()
        self.distributed = self.topo.world.world_size > 1
        self.main = self.topo.is_main
        self.progress = progress and self.main
        self.run_dir = cfg.run_dir
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.tp = (
            TensorParallel.from_parallel_state(cfg.parallel.sequence_parallel)
            if self.distributed
            else SINGLE
        )
        self.cp = (
            ContextParallel.from_parallel_state(cfg.parallel.dispatch)
            if self.distributed
            else SINGLE_CONTEXT
        )
        # Gradients and losses are averaged over the replicas that see different tokens: the
        # data-parallel ranks and, within each, the context-parallel ranks.
        self.dp_group = data_parallel_group(with_context=True) if self.distributed else None
        self.dp_cp_size = self.topo.dp_size * self.cp.size
        dp_rank, dp_size = self.topo.dp_rank, self.topo.dp_size
        if t.global_batch_size % (t.micro_batch_size * dp_size):
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp_size})"
            )
        self.pipeline = self._pipeline_place()
        self.device = self.topo.device if self.distributed else select_device(cfg)
        _seed_everything(t.seed)  # the same on every rank: the same initial weights
        self.tokenizer = self._tokenizer()
        # One chunk per (virtual) pipeline stage this rank runs; ``model`` names them all.
        self.chunks = model_chunks_for(
            cfg, self.tokenizer.vocab_size, self.device, self.tp, self.cp, self.pipeline
        )
        self.model = self.chunks[0] if len(self.chunks) == 1 else StageChunks(self.chunks)
        # Dropout streams: one per (data, context) rank, i.e. per slice of tokens, shared by
        # the tensor-parallel ranks (replicated regions agree); megatron-core's tracker adds
        # one per tensor-parallel rank for the split regions.
        stream = t.seed + 100 * (dp_rank * self.cp.size + self.cp.rank)
        _seed_everything(stream)
        if self.tp.active:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(stream)
        self.optimizer = optimizer_for(self.model, cfg.optimizer)
        self.scheduler = scheduler_for(self.optimizer, cfg.optimizer, t.max_steps)
        self.zero = self._zero_engine() if cfg.optimizer.zero_stage else None
        self.loader = PretrainLoader(
            cfg.data, self.tokenizer, t.seq_length, t.global_batch_size, dp_rank, dp_size
        )
        self.val_samples = validation_samples(
            cfg.data, self.tokenizer, t.seq_length, t.eval_samples, dp_rank, dp_size
        )
        self.token_bytes = self.tokenizer.token_bytes()
        self.step = 0
        self.skipped_steps = 0
        self.restarts = 0  # resumes of this run
        self.run_id = ""
        self._stop_requested = False
        self._resume()

    def _pipeline_place(self) -> PipelinePlace:
        p, t = self.cfg.parallel, self.cfg.train
        if self.topo.sizes.pipeline == 1:
            return PipelinePlace.build(self.cfg.model.layers, 1, 0)
        micro_batches = t.global_batch_size // (t.micro_batch_size * self.topo.dp_size)
        if p.virtual_stages > 1 and micro_batches % self.topo.sizes.pipeline:
            raise ConfigError(
                f"the interleaved pipeline needs micro-batches per step ({micro_batches} = "
                "train.global_batch_size / (micro_batch_size x data-parallel size)) to be a "
                f"multiple of parallel.pipeline ({self.topo.sizes.pipeline})"
            )
        return PipelinePlace.from_parallel_state(
            self.cfg.model.layers, p.virtual_stages, p.stage_layers
        )

    def _zero_engine(self) -> ZeroEngine:
        """DeepSpeed ZeRO over the data x context ranks; it owns gradient reduction,
        clipping and the optimizer step (our schedule stays ours)."""
        from parallel.zero import ZeroEngine

        t, stage = self.cfg.train, self.cfg.optimizer.zero_stage
        if not dist.is_initialized():
            raise ConfigError(
                "optimizer.zero_stage needs a process group (init_distributed; `seqboat "
                "train` creates one, also for a single process)"
            )
        if self.pipeline.active:  # the schedule accumulates: DeepSpeed sees one batch
            micro, accumulation = t.global_batch_size // self.topo.dp_size, 1
        else:
            micro = t.micro_batch_size
            accumulation = t.global_batch_size // (micro * self.topo.dp_size)
        tied = [] if self.model.head is not None else [(self.model, self.model.embedding.weight)]
        return ZeroEngine.build(
            self.model, self.optimizer, self.scheduler, stage=stage, micro_batch_size=micro,
            grad_accum_steps=accumulation, clip_grad=self.cfg.optimizer.clip_grad,
            sequence_parallel=self.tp.sequence_parallel, external_params=tied,
            local_rank=self.topo.world.local_rank, stage_copies=self._tied_copies(),
        )  # fmt: skip

    def _tokenizer(self) -> Tokenizer:
        """Rank 0 trains a missing tokenizer; the others wait and load it."""
        tokenizer = tokenizer_for(self.cfg) if self.main else None
        self._barrier()
        return tokenizer if tokenizer is not None else tokenizer_for(self.cfg)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ------------------------------------------------------------------ run directory

    def _resume(self) -> None:
        saved = self.run_dir / "config.yaml"
        # Every rank checks (the same file, the same verdict: no rank waits for one that
        # raised); rank 0 writes.
        if saved.is_file():
            _check_resumable(parse_yaml(saved.read_text()), self.cfg.to_dict(), self.run_dir)
        self._barrier()
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, saved)
        self._barrier()
        if self.main:
            remove_partial(self.run_dir)  # a killed save's step_X.tmp
        # Under ZeRO, DeepSpeed loads the model and optimizer from its own files.
        template = None if self.zero is not None else self._sharded_template
        loaded = load_latest(self.run_dir, self.layout(), template)
        if loaded is None:
            self.run_id = _broadcast_object(new_run_id() if self.main else None, self.distributed)
            return
        state, path = loaded
        if self.zero is not None:  # model and optimizer from DeepSpeed's files
            _check_zero_resharding(state["saved_layout"], self.layout().sizes(), path)
            self.zero.load(path / ZERO_DIR, ZERO_TAG)
        else:
            load_model(self.model, state["sharded"])
            load_optimizer(self.optimizer, self.model, state["optimizer"], state["sharded"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        if not state["elastic"]:  # else this rank's dropout stream is new: seeded in __init__
            _set_rng_state(state["rng"])
        self.step = int(state["train"]["step"])
        self.skipped_steps = int(state["train"]["skipped_steps"])
        self.run_id = str(state["train"]["run_id"])
        self.restarts = int(state["train"].get("restarts", 0)) + 1
        if self.main:
            how = _layout_change(state["saved_layout"], self.layout().sizes())
            print(f"seqboat: resuming {self.run_dir} from {path.name}{how}", file=sys.stderr)

    def state_dict(self) -> dict[str, Any]:
        """This rank's checkpoint file: everything but the model and optimizer tensors
        (``sharded_state_dict``)."""
        return {
            "optimizer": None if self.zero is not None else self._optimizer_record(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": _rng_state(self.tp),
            "train": {
                "step": self.step,
                "skipped_steps": self.skipped_steps,
                "run_id": self.run_id,
                "restarts": self.restarts,
            },
            "layout": {
                "tp_rank": self.tp.rank,
                "tp_size": self.tp.size,
                "cp_rank": self.cp.rank,
                "cp_size": self.cp.size,
                "dp_rank": self.topo.dp_rank,
                "dp_size": self.topo.dp_size,
                "pp_rank": self.pipeline.rank,
                "pp_size": self.pipeline.size,
                "split": split_layout(self.model),
            },
        }

    def _optimizer_record(self) -> dict[str, Any]:
        """The optimizer record, covering every pipeline stage's parameters (a run resumed
        on another layout reads one rank's file)."""
        record = optimizer_record(self.optimizer, self.model)
        for key in ("shapes", "scalars"):
            record[key] = self._gather_stages(record[key])
        return record

    def place(self) -> Place:
        """This rank's place for the sharded model and optimizer: its tensor-parallel shard,
        which of the data x context copies it is, and, under pipeline parallelism, which
        keys are copies of another stage's (a tied head's embedding on the last stage)."""
        replica = self.topo.dp_rank * self.cp.size + self.cp.rank
        owns_embedding = self.pipeline.is_first

        def owner(key: str) -> int:
            return int(key == "embedding.weight" and not owns_embedding)

        return Place(self.tp.rank, self.tp.size, replica, self.dp_cp_size, owner)

    def sharded_state_dict(self) -> dict[str, Any]:
        """The model and optimizer tensors as megatron-core sharded tensors, the writing
        shared out over the data/context-parallel copies."""
        place = self.place()
        sharded = model_sharded_state_dict(self.model, place)
        if self.zero is None:  # else in DeepSpeed's files
            sharded |= optimizer_sharded_state_dict(self.optimizer, self.model, place)
        return spread_writes(sharded, place)

    def _sharded_template(self, state: dict[str, Any]) -> dict[str, Any]:
        """Tensors to load a checkpoint into, from its (rank) file's optimizer record."""
        place = self.place()
        return {
            **model_sharded_state_dict(self.model, place, template=True),
            **optimizer_sharded_state_dict(self.optimizer, self.model, place, state["optimizer"]),
        }

    def layout(self) -> Layout:
        return Layout(
            self.tp.rank, self.tp.size, self.cp.rank, self.cp.size,
            self.topo.dp_rank, self.topo.dp_size, self.pipeline.rank, self.pipeline.size,
        )  # fmt: skip

    def save(self) -> float:
        """Saves a checkpoint of the current step; returns the seconds it took."""
        start = time.perf_counter()
        zero = self.zero
        with zero.gathered() if zero is not None else contextlib.nullcontext():
            sharded = self.sharded_state_dict()  # whole parameters, also under ZeRO-3
        save_checkpoint(
            self.run_dir, self.step, self.state_dict(), self.cfg.checkpoint.keep_last,
            self.layout(), sharded,
            None if zero is None else lambda folder: zero.save(folder / ZERO_DIR, ZERO_TAG),
        )  # fmt: skip
        return time.perf_counter() - start

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        monitor = Monitor(cfg, self.run_dir, self.run_id, self.step, enabled=self.main)
        previous_handlers = self._install_stop_handlers()
        bar = tqdm(
            total=t.max_steps, initial=self.step, disable=not self.progress, desc="train",
            dynamic_ncols=True, file=sys.stderr,
        )  # fmt: skip
        window: list[float] = []
        nonfinite_in_a_row = 0
        tokens_per_step = t.global_batch_size * t.seq_length
        last_saved = self.step
        val: dict[str, float] | None = None
        if self.step == 0:  # the starting point of the validation curve
            monitor.log({f"val/{k}": v for k, v in self.evaluate().items()}, 0)
        try:
            while self.step < t.max_steps:
                log_now = (self.step + 1) % t.log_interval == 0
                heatmap_now = t.heatmap_interval and (self.step + 1) % t.heatmap_interval == 0
                start = time.perf_counter()
                loss, grad_norm, stats = self._train_step(collect_stats=log_now or heatmap_now)
                elapsed = time.perf_counter() - start
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    nonfinite_in_a_row = 0
                    window.append(loss)
                else:
                    nonfinite_in_a_row += 1
                    self.skipped_steps += 1
                    if nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
                        raise NonFiniteLossError(
                            f"loss or gradient was non-finite for {nonfinite_in_a_row} steps in "
                            f"a row (last at step {self.step}); lower optimizer.lr or use fp32"
                        )
                self.step += 1
                bar.update(1)
                if log_now:
                    metrics = {
                        "train/loss": sum(window) / max(len(window), 1),
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/grad_norm": grad_norm,
                        "train/step_time_s": elapsed,
                        "train/skipped_steps": self.skipped_steps,
                        "run/restarts": self.restarts,
                        **self._throughput(tokens_per_step / elapsed, stats),
                        **_layer_metrics(stats),
                    }
                    monitor.log(metrics, self.step)
                    bar.set_postfix(
                        loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}"
                    )
                    window = []
                if heatmap_now and stats and monitor.run is not None:
                    heat = torch.stack([s.activated[:, 0].float().cpu() for s in stats])
                    path = self.run_dir / "plots" / f"activation_{self.step:08d}.png"
                    monitor.log_image(
                        "activation", save_heatmap(heat, path, "training batch"), self.step
                    )
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    val = self.evaluate()
                    monitor.log({f"val/{k}": v for k, v in val.items()}, self.step)
                if self.step % cfg.checkpoint.interval == 0 or self.step == t.max_steps:
                    monitor.log({"checkpoint/save_s": self.save()}, self.step)
                    last_saved = self.step
                if self._stop_agreed():
                    if last_saved != self.step:
                        monitor.log({"checkpoint/save_s": self.save()}, self.step)
                    # srun --kill-on-bad-exit answers the first rank's exit 75 with SIGTERM
                    # to the others: they must leave with 75 too, not die by the signal. The
                    # process is on its way out (see Preempted), so SIGTERM stays ignored.
                    previous_handlers.pop(signal.SIGTERM, None)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    raise Preempted(self.step)
        finally:
            bar.close()
            monitor.close()
            self._restore_handlers(previous_handlers)
        if val is None:  # the run was already complete: nothing trained, report anyway
            val = self.evaluate()
        return TrainResult(self.step, val, self.sample())

    def _throughput(self, tokens_per_s: float, stats: list[LayerStats] | None) -> dict:
        """Tokens/s (total and per rank), model TFLOP/s counted dense-equivalent and at the
        measured activation ratios, MFU when ``train.peak_tflops`` is set, peak memory."""
        cfg, world = self.cfg, self.topo.world.world_size
        ratios = [float(s.activated.float().mean()) for s in stats] if stats else None
        per_token = {
            "dense": training_flops_per_token(
                cfg.model, self.model.padded_vocab, cfg.train.seq_length
            ),
            "activated": training_flops_per_token(
                cfg.model, self.model.padded_vocab, cfg.train.seq_length, ratios
            ),
        }
        out = {
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_rank": tokens_per_s / world,
        }
        for kind, flops in per_token.items():
            out[f"perf/tflops_{kind}"] = flops * tokens_per_s / 1e12
            if cfg.train.peak_tflops > 0:
                out[f"perf/mfu_{kind}"] = out[f"perf/tflops_{kind}"] / (
                    cfg.train.peak_tflops * world
                )
        out["perf/max_memory_mib"] = _max_memory_mib(self.device)
        return out

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: all ranks save and leave at the same step."""
        if not self.distributed:
            return self._stop_requested
        flag = torch.tensor([float(self._stop_requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _train_step(self, collect_stats: bool) -> tuple[float, float, list[LayerStats] | None]:
        micro_batches = next(self.loader).split(self.cfg.train.micro_batch_size)
        self.model.train()
        if self.pipeline.active:
            total, stats = self._pipeline_backward(micro_batches, collect_stats)
            sync_tied_grads(self._tied_weights(), self.pipeline)
        else:
            total, stats = self._backward(micro_batches, collect_stats)
        if self.dp_group is not None:
            total = average(total, self.dp_group, self.dp_cp_size)
        total = float(total)
        if self.zero is not None:  # reduction, clipping, step (or skip) and schedule
            return total, self.zero.step(skip=not math.isfinite(total)).grad_norm, stats
        for chunk in self.chunks:
            sync_partial_grads(chunk, self.tp)
        if self.dp_group is not None:
            average_gradients(self.model, self.dp_group, self.dp_cp_size)
        grad_norm = clip_gradients(
            list(self.model.parameters()), self.cfg.optimizer.clip_grad, self.tp,
            self._pipeline_group(), self._tied_copies(),
        )  # fmt: skip
        if math.isfinite(total) and math.isfinite(grad_norm):
            self.optimizer.step()
        # A skipped step still consumes its batch and its place in the schedule.
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total, grad_norm, stats

    def _backward(
        self, micro_batches: tuple[Tensor, ...], collect_stats: bool
    ) -> tuple[Tensor, list[LayerStats] | None]:
        """Gradient accumulation over the micro-batches; their mean loss (this rank's)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        stats = None
        for i, micro in enumerate(micro_batches):
            with autocast_for(self.cfg.train.precision, self.device):
                loss, micro_stats = self.model.loss(
                    self.cp.chunk(micro).to(self.device), collect_stats and i == 0
                )
            if self.zero is not None:
                self.zero.backward(loss)  # divided by the accumulation steps inside
            else:
                (loss / len(micro_batches)).backward()
            total += loss.detach().double() / len(micro_batches)
            stats = stats or micro_stats
        return total, stats

    def _pipeline_backward(
        self, micro_batches: tuple[Tensor, ...], collect_stats: bool
    ) -> tuple[Tensor, list[LayerStats] | None]:
        """One 1F1B (or interleaved) schedule over the micro-batches; their mean loss, from
        the last stage, and with ``collect_stats`` every layer's statistics of the first
        micro-batch, gathered from the stages in layer order."""
        t = self.cfg.train
        dtype = next(self.model.parameters()).dtype
        stats: dict[int, list[LayerStats]] | None = {} if collect_stats else None
        with autocast_for(t.precision, self.device):
            loss = pipeline_step(
                self.chunks, self.pipeline,
                [self.cp.chunk(m).to(self.device) for m in micro_batches],
                stage_forward(dtype, stats),
                seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                hidden_size=self.cfg.model.width, dtype=dtype,
                sequence_parallel=self.tp.sequence_parallel,
            )  # fmt: skip
        loss = broadcast_loss(loss, self.pipeline, self.device)
        if stats is None:
            return loss, None
        local = {first: [_to_cpu(s) for s in layer_stats] for first, layer_stats in stats.items()}
        gathered = self._gather_stages(local)
        return loss, [s for first in sorted(gathered) for s in gathered[first]]

    def _pipeline_group(self) -> dist.ProcessGroup | None:
        if not self.pipeline.active:
            return None
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_group()

    def _tied_weights(self) -> list[nn.Parameter]:
        """This rank's copies of the weight tied between the first and the last stage."""
        return [w for c in self.chunks for w in c.tied_weights()]

    def _tied_copies(self) -> list[nn.Parameter]:
        """Weights this rank holds a copy of for another stage (counted once in norms)."""
        return [] if self.pipeline.is_first else self._tied_weights()

    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        if self.pipeline.active:
            return evaluate_pipeline(
                self.chunks, self.pipeline, self.val_samples, self.token_bytes,
                t.micro_batch_size, t.precision, self.dp_group, self.cp,
                self.tp.sequence_parallel,
            )  # fmt: skip
        return evaluate(
            self.model, self.val_samples, self.token_bytes, t.micro_batch_size,
            t.precision, self.dp_group, self.cp,
        )  # fmt: skip

    def sample(self, prompt_tokens: int = 16, new_tokens: int = 48) -> str:
        """A short generated continuation of the first validation text (by rank 0, from
        the whole model; empty on the other ranks)."""
        model = self.model
        zero3 = self.zero is not None and self.zero.stage == 3  # parameters are partitioned
        if self.tp.active or self.cp.active or self.pipeline.active or zero3:
            with self.zero.gathered() if zero3 else contextlib.nullcontext():
                full = self._gather_stages(full_state_dict(self.model, self.tp))
            if not self.main:
                return ""
            # Decode on the whole single-process model.
            model = model_for(self.cfg, self.tokenizer.vocab_size, self.device)
            model.load_state_dict(full)
        if not self.main:
            return ""
        prompt = self.val_samples[0, :prompt_tokens].tolist()
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        out = generate(
            model, prompt, new_tokens, temperature=0.8, top_k=40, generator=generator,
            eos_id=self.tokenizer.eos_id,
        )  # fmt: skip
        return self.tokenizer.decode(prompt) + " >>> " + self.tokenizer.decode(out)

    def _gather_stages(self, state: dict[str, Any]) -> dict[str, Any]:
        """The union of the pipeline stages' ``state`` dicts, keyed by global names (a tied
        copy equals its original). Collective over the pipeline group."""
        if not self.pipeline.active:
            return state
        from megatron.core import parallel_state

        parts: list[Any] = [None] * self.pipeline.size
        group = parallel_state.get_pipeline_model_parallel_group()
        dist.all_gather_object(parts, state, group=group)
        return {k: v for part in parts for k, v in part.items()}

    # ------------------------------------------------------------------ stop requests

    def _install_stop_handlers(self) -> dict[int, Any]:
        def request_stop(signum: int, frame: Any) -> None:
            # Only set a flag: the step finishes and the checkpoint is written at its end.
            self._stop_requested = True

        # A request that came while the process was still starting (see record_early_stops).
        self._stop_requested = self._stop_requested or early_stop_requested()

        previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread: leave signals to the caller
                break
        return previous

    @staticmethod
    def _restore_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _max_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _to_cpu(stats: LayerStats) -> LayerStats:
    """For gathering between ranks as Python objects (CUDA tensors would unpickle on the
    sender's device)."""
    return dataclasses.replace(
        stats, activated=stats.activated.cpu(), span_sum=stats.span_sum.cpu(),
        span_pairs=stats.span_pairs.cpu(),
    )  # fmt: skip


def _layer_metrics(stats: list[LayerStats] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, s in enumerate(stats or []):
        out[f"layer_{i}/act_ratio"] = float(s.activated.float().mean())
        out[f"layer_{i}/attn_span"] = float(s.span_sum) / max(int(s.span_pairs), 1)
        if s.imbalance is not None:
            out[f"layer_{i}/work_imbalance_before"], out[f"layer_{i}/work_imbalance_after"] = (
                s.imbalance
            )
    return out


# The sizes of a checkpoint's layout that split the model (the rest is data parallelism).
MODEL_SPLIT = ("tp_size", "cp_size", "pp_size")


def _sizes(layout: dict[str, int], keys: tuple[str, ...]) -> str:
    return "x".join(str(layout.get(k, 1)) for k in keys)


def _layout_change(saved: dict[str, int], now: dict[str, int]) -> str:
    """How the split changed since the checkpoint, for the resume message ("" if not)."""
    if saved == now:
        return ""
    if _sizes(saved, MODEL_SPLIT) == _sizes(now, MODEL_SPLIT):
        return " on a different data-parallel size"
    keys = (*MODEL_SPLIT, "dp_size")
    return (
        f" resharded (tensor x context x pipeline x data {_sizes(saved, keys)} -> "
        f"{_sizes(now, keys)})"
    )


def _check_zero_resharding(saved: dict[str, int], now: dict[str, int], path: Path) -> None:
    """DeepSpeed's files reshard over data-parallel ranks only (ZeRO-1/2, through its
    universal checkpoint)."""
    if _sizes(saved, MODEL_SPLIT) != _sizes(now, MODEL_SPLIT):
        raise ConfigError(
            f"{path} holds ZeRO optimizer state of tensor x context x pipeline "
            f"{_sizes(saved, MODEL_SPLIT)}; a ZeRO run resumes on another data-parallel size "
            "only: keep parallel.tensor, context and pipeline"
        )


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    changed = []
    for key in FROZEN_ON_RESUME:
        a, b = _lookup(saved, key), _lookup(current, key)
        if a != b:
            changed.extend(_diff(a, b, key))
    if changed:
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({'; '.join(changed[:5])}); "
            "resume it with its own config, or set run.name / run.dir for a new run"
        )


def _lookup(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _diff(a: Any, b: Any, key: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{key}.{k}")]
    return [] if a == b else [f"{key}: {a!r} -> {b!r}"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(tp: TensorParallel) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if tp.active:  # megatron-core's per-tensor-rank dropout stream
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tracker" in state:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])


def _broadcast_object(obj: Any, distributed: bool) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
