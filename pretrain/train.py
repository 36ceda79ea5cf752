"""The training loop.

One ``Trainer`` owns one run directory. It builds the run's components (``pretrain/build.py``),
resumes from the newest complete checkpoint if there is one (model, optimizer, schedule,
data position and every RNG, so the continued loss curve is the one an uninterrupted run
would have produced), then loops: step, log, evaluate, save, stop when asked.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from data.loader import PretrainLoader, validation_samples
from data.prefetch import Prefetcher
from parallel.comm import broadcast_object
from parallel.dims import ParallelDims
from pretrain.build import (
    model_chunks_for,
    model_for,
    optimizer_for,
    pipeline_place_for,
    scheduler_for,
    select_device,
    shared_tokenizer,
    zero_engine_for,
)
from pretrain.checkpointer import Checkpointer
from pretrain.config import Config
from pretrain.evaluate import evaluate, evaluate_pipeline, sample_text
from pretrain.metrics import StepMetrics
from pretrain.model.lm import StageChunks
from pretrain.model.recompute import set_recompute
from pretrain.monitor import Monitor, new_run_id
from pretrain.plot import save_heatmap
from pretrain.profiling import ProfileWindow
from pretrain.rng import rng_state, seed_dropout_streams, seed_everything, set_rng_state
from pretrain.run_dir import prepare_run_dir
from pretrain.spike_guard import SpikeGuard
from pretrain.steps import StepResult, train_step_for
from pretrain.stop import StopSignals, hang_for_tests
from pretrain.stragglers import StragglerReport

# Exit code of a run that saved a checkpoint because it was asked to stop (SIGUSR1 or
# SIGTERM, e.g. Slurm preemption): a launcher reads it as "requeue me".
REQUEUE_EXIT_CODE = 75


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


@dataclass
class Progress:
    """The counters a checkpoint keeps besides the tensors (the rank file's ``train``)."""

    step: int = 0
    skipped_steps: int = 0  # non-finite or spikes: the weights were left alone
    spike_steps: int = 0  # of those, the spike guard's
    run_id: str = ""
    restarts: int = 0  # resumes of this run


class Trainer:
    """One rank's share of a run. ``dims`` comes from ``pretrain.build.parallel_dims_for``
    (``parallel.topology.init_distributed``); without it the run is one process with no
    process group."""

    def __init__(self, cfg: Config, progress: bool = True, dims: ParallelDims | None = None):
        self.cfg, t = cfg, cfg.train
        self.dims = dims or ParallelDims.single(select_device(cfg))
        self.run_dir = cfg.run_dir
        self.progress = progress and self.dims.is_main
        if t.threads:
            torch.set_num_threads(t.threads)
        self._build()
        self.state = Progress()
        self._resume()

    # The counters, read-only (``state`` is what the loop and checkpoints change).
    step = property(lambda self: self.state.step)
    skipped_steps = property(lambda self: self.state.skipped_steps)
    restarts = property(lambda self: self.state.restarts)
    run_id = property(lambda self: self.state.run_id)

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        cfg, t, state = self.cfg, self.cfg.train, self.state
        monitor = Monitor(cfg, self.run_dir, state.run_id, state.step, enabled=self.dims.is_main)
        bar = tqdm(
            total=t.max_steps, initial=state.step, disable=not self.progress, desc="train",
            dynamic_ncols=True, file=sys.stderr,
        )  # fmt: skip
        nonfinite_in_a_row, last_saved, val = 0, state.step, None
        profiler = ProfileWindow(
            t.profile_steps, t.profile_ranks, self.dims.world.rank, self.run_dir
        )
        if state.step == 0:  # the starting point of the validation curve
            monitor.log({f"val/{k}": v for k, v in self.evaluate().items()}, 0)
        try:
            with StopSignals() as stop:
                while state.step < t.max_steps:
                    log_now = (state.step + 1) % t.log_interval == 0
                    heatmap_now = t.heatmap_interval and (state.step + 1) % t.heatmap_interval == 0
                    profiler.before_step(state.step + 1)
                    result = self.train_step(collect_stats=log_now or heatmap_now)
                    nonfinite_in_a_row = self._count_nonfinite(result, nonfinite_in_a_row)
                    state.step += 1
                    profiler.after_step(state.step)
                    bar.update(1)
                    if log_now:
                        metrics = self._log_record(result)
                        monitor.log(metrics, state.step)
                        bar.set_postfix(
                            loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}"
                        )
                    if heatmap_now and result.stats and monitor.run is not None:
                        self._log_heatmap(monitor, result)
                    if state.step % t.eval_interval == 0 or state.step == t.max_steps:
                        val = self.evaluate()
                        monitor.log({f"val/{k}": v for k, v in val.items()}, state.step)
                    if state.step % cfg.checkpoint.interval == 0 or state.step == t.max_steps:
                        monitor.log({"checkpoint/save_s": self.save()}, state.step)
                        last_saved = state.step
                    self._log_background_save(monitor, self.checkpointer.poll())
                    hang_for_tests(state.step, self.dims.world.rank)
                    if stop.agreed(self.dims.distributed, self.dims.device):
                        if last_saved != state.step:  # synchronous: the job is ending
                            monitor.log({"checkpoint/save_s": self.save(False)}, state.step)
                        self._log_background_save(monitor, self.checkpointer.wait())
                        self.checkpointer.close()
                        stop.leave()
                        raise Preempted(state.step)
                # The last checkpoint is published before the run reports completion.
                self._log_background_save(monitor, self.checkpointer.wait())
                self.checkpointer.close()
        finally:
            # A run that failed: its writer process, its shared memory with it, goes now, not
            # with this process (closed already when the run finished or stopped).
            self.checkpointer.abort()
            self.loader.close()  # the data thread ends before the process may
            profiler.close()
            bar.close()
            monitor.close()
        if val is None:  # the run was already complete: nothing trained, report anyway
            val = self.evaluate()
        return TrainResult(state.step, val, self.sample())

    def train_step(self, collect_stats: bool) -> StepResult:
        """One optimizer step on the next global batch (this rank's rows of it)."""
        start = time.perf_counter()
        batch = next(self.loader)
        loaded = time.perf_counter()
        result = self.step_fn(batch, collect_stats)
        self.metrics.record(result.loss, time.perf_counter() - start, loaded - start)
        return result

    def _count_nonfinite(self, result: StepResult, in_a_row: int) -> int:
        """Counts a skipped step (weights unchanged: non-finite, or a spike); gives up after
        ``train.max_nonfinite_in_a_row`` non-finite steps in a row. Returns the new run."""
        self.state.skipped_steps += not result.applied
        self.state.spike_steps += result.spike
        if result.spike or (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
            return 0  # (ZeRO reports no norm for a skipped spike)
        if in_a_row + 1 >= self.cfg.train.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"loss or gradient was non-finite for {in_a_row + 1} steps in a row (last at "
                f"step {self.state.step}); lower optimizer.lr or use fp32"
            )
        return in_a_row + 1

    def _log_heatmap(self, monitor: Monitor, result: StepResult) -> None:
        """Which tokens each layer activated in the first sequence of the step's batch."""
        heat = torch.stack([s.heat.float() for s in result.stats or []])
        path = self.run_dir / "plots" / f"activation_{self.state.step:08d}.png"
        monitor.log_image("activation", save_heatmap(heat, path, "training batch"), self.state.step)

    def _log_record(self, result: StepResult) -> dict[str, float]:
        window = self.metrics.summary(result.stats, self.dims.device)
        return {
            **window,
            **self.stragglers.gather(
                window["train/step_time_s"], window["train/data_wait_fraction"]
            ),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": result.grad_norm,
            "train/skipped_steps": self.state.skipped_steps,
            "train/spike_steps": self.state.spike_steps,
            "run/restarts": self.state.restarts,
        }

    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity, bits per byte, and the ``eval.tasks`` metrics."""
        if not self.cfg.eval.tasks:
            return self._validation()
        from pretrain.hf.in_loop import harness_metrics  # the [hf] extra: only when asked

        return self._validation() | harness_metrics(self)

    def _validation(self) -> dict[str, float]:
        t, d = self.cfg.train, self.dims
        group = d.dp_group() if d.distributed else None
        if self.place.active:
            return evaluate_pipeline(
                self.chunks, self.place, self.val_samples, self.token_bytes,
                t.micro_batch_size, t.precision, group, d.context, d.sequence_parallel,
            )  # fmt: skip
        return evaluate(
            self.model, self.val_samples, self.token_bytes, t.micro_batch_size, t.precision,
            group, d.context,
        )  # fmt: skip

    def sample(self, prompt_tokens: int = 16) -> str:
        """A short continuation of the first validation text (rank 0; "" elsewhere)."""
        zero3 = self.zero is not None and self.zero.stage == 3  # parameters are partitioned
        vocab, device = self.tokenizer.vocab_size, self.dims.device
        prompt = self.val_samples[0, :prompt_tokens].tolist() if self.dims.is_main else []
        return sample_text(
            self.model, self.dims, lambda: model_for(self.cfg, vocab, device), self.tokenizer,
            prompt, self.cfg.train.seed, self.zero.gathered() if zero3 else None,
        )  # fmt: skip

    def save(self, background: bool | None = None) -> float:
        """Saves a checkpoint of the current step (in the background with
        ``checkpoint.async`` unless ``background=False``); returns the seconds training was
        blocked."""
        rank_state = {
            "scheduler": self.scheduler.state_dict(),
            "data": self._data_state(),
            "rng": rng_state(self.dims),
            "train": asdict(self.state),
            "spike_guard": self.guard.state_dict() if self.guard is not None else None,
        }
        keep = self.cfg.checkpoint.keep_last
        return self.checkpointer.save(self.run_dir, self.state.step, rank_state, keep, background)

    def _log_background_save(self, monitor: Monitor, written: list[tuple[int, float]]) -> None:
        """The writing time of each background save that completed, logged at the current
        step (W&B takes steps in order only) with the step it saved."""
        for step, seconds in written:
            record = {"checkpoint/write_s": seconds, "checkpoint/written_step": step}
            monitor.log(record, self.state.step)

    def _data_state(self) -> dict:
        """Every lane's state, gathered over the data-parallel ranks: any rank's file
        resumes any data-parallel size (an elastic resume reads rank 0's)."""
        group = self.dims.dp_group(with_context=False) if self.dims.distributed else None
        return self.loader.state_dict(group)

    # ------------------------------------------------------------------ building, resuming

    def _build(self) -> None:
        cfg, t, dims = self.cfg, self.cfg.train, self.dims
        self.place = pipeline_place_for(cfg, dims)
        seed_everything(t.seed)  # the same on every rank: the same initial weights
        self.tokenizer = shared_tokenizer(cfg, dims)
        self.token_bytes = self.tokenizer.token_bytes()
        vocab = self.tokenizer.vocab_size
        # One chunk per (virtual) pipeline stage this rank runs; ``model`` names them all.
        self.chunks = model_chunks_for(cfg, vocab, dims.device, dims, self.place)
        self.model = self.chunks[0] if len(self.chunks) == 1 else StageChunks(self.chunks)
        set_recompute(self.model, t.recompute)  # every layer of every chunk
        seed_dropout_streams(t.seed, dims)
        self.optimizer = optimizer_for(self.model, cfg.optimizer)
        self.scheduler = scheduler_for(self.optimizer, cfg.optimizer, t.max_steps)
        self.zero = None
        if cfg.optimizer.zero_stage:
            parts = (self.chunks, self.model, self.optimizer, self.scheduler)
            self.zero = zero_engine_for(cfg, dims, *parts)
        self.guard = SpikeGuard(t.spike_guard, t.spike_window) if t.spike_guard > 0 else None
        self.step_fn = train_step_for(
            cfg, dims, self.place, self.chunks, self.model, self.optimizer, self.scheduler,
            self.zero, self.guard,
        )  # fmt: skip
        self.metrics = StepMetrics(cfg, self.model.padded_vocab, dims.world.world_size)
        self.stragglers = StragglerReport(dims, t.straggler_threshold)
        self.checkpointer = Checkpointer(
            self.model,
            self.optimizer,
            dims,
            self.zero,
            background=cfg.checkpoint.async_save,
            timeout_s=t.timeout_s,
        )
        dp_rank, dp_size = dims.dp_rank, dims.dp_size
        loader = PretrainLoader(
            cfg.data, self.tokenizer, t.seq_length, t.global_batch_size, dp_rank, dp_size
        )
        self.loader = Prefetcher(loader, cfg.data.prefetch, dims.device)
        self.val_samples = validation_samples(
            cfg.data, self.tokenizer, t.seq_length, t.eval_samples, dp_rank, dp_size
        )

    def _resume(self) -> None:
        prepare_run_dir(self.cfg, self.dims)
        restored = self.checkpointer.restore(self.run_dir)
        if restored is None:
            run_id = new_run_id() if self.dims.is_main else None
            self.state.run_id = broadcast_object(run_id, self.dims.distributed)
            return
        saved = restored.state
        self.scheduler.load_state_dict(saved["scheduler"])
        self.loader.load_state_dict(saved["data"])
        if not restored.elastic:  # else this rank's dropout stream is new: seeded in _build
            set_rng_state(saved["rng"])
        if self.guard is not None and saved.get("spike_guard") is not None:
            self.guard.load_state_dict(saved["spike_guard"])
        counters = saved["train"]
        self.state = Progress(**{**counters, "restarts": counters.get("restarts", 0) + 1})
        if self.dims.is_main:
            how = restored.resharding(self.dims.sizes())
            name = restored.path.name
            print(f"seqboat: resuming {self.run_dir} from {name}{how}", file=sys.stderr)
