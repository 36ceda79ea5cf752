"""The checkpoint recipe: which tensors a rank saves, how they are keyed and sharded, and how
a saved run is restored onto this rank's split (resharded when the split changed).

``Checkpointer`` is the one implementation the Trainer, the tests and the benches use. The
file format (atomic publication, checksums, ``latest``) is ``pretrain/checkpoint.py``'s; the
sharding rules are ``parallel/sharding.py``'s; this module joins them for one rank:

* the model (all of this rank's pipeline chunks, keyed by global names) and, without ZeRO,
  the optimizer's tensors go through megatron-core ``dist_checkpointing``, written by the
  data/context copies in turn (``spread_writes``);
* the optimizer's record (hyper-parameters, state shapes: covering every pipeline stage, so
  that a run resumed on another layout can read any one rank's file) goes into the rank file
  beside what the caller adds (schedule, data position, RNG, counters);
* under ZeRO, DeepSpeed's own files (model and optimizer partitions) go into the step folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from parallel.dims import MODEL_SPLIT, ParallelDims, sizes_text
from parallel.pipeline import merge_over_stages
from parallel.sharding import (
    MODEL,
    Place,
    load_model,
    load_optimizer,
    model_sharded_state_dict,
    model_tensors,
    optimizer_record,
    optimizer_sharded_state_dict,
    optimizer_tensors,
    spread_writes,
)
from pretrain.background_save import BackgroundWriter
from pretrain.checkpoint import (
    SHARDED,
    ShardingCheck,
    complete_checkpoints,
    load_latest,
    load_rank_file,
    load_sharded,
    read_meta,
    remove_partial,
    stage_checkpoint,
    timed,
    verify_files,
    write_checkpoint,
)
from pretrain.config import Config, ConfigError, config_from_dict, parse_yaml

if TYPE_CHECKING:
    from data.tokenizer import Tokenizer
    from parallel.zero import ZeroEngine

# DeepSpeed's files in a checkpoint: <step>/deepspeed/zero/.
ZERO_DIR, ZERO_TAG = "deepspeed", "zero"


@dataclass
class Restored:
    """What ``Checkpointer.restore`` read besides the model and optimizer it loaded."""

    state: dict[str, Any]  # the rank file: the caller's entries (schedule, data, RNG, ...)
    path: Path  # the checkpoint folder
    elastic: bool  # saved on another split: the per-rank entries are rank 0's, not ours
    saved_sizes: dict[str, int]  # the split it was saved with

    def resharding(self, now: dict[str, int]) -> str:
        """How the split changed since the checkpoint, for the resume message ("" if not)."""
        if self.saved_sizes == now:
            return ""
        if sizes_text(self.saved_sizes) == sizes_text(now):
            return " on a different data-parallel size"
        keys = (*MODEL_SPLIT, "dp_size")
        return (
            f" resharded (tensor x context x pipeline x data {sizes_text(self.saved_sizes, keys)}"
            f" -> {sizes_text(now, keys)})"
        )


class Checkpointer:
    """Saves and restores one rank's share of a run (collective: every rank calls the same
    methods in the same order).

    ``model``: this rank's model (its pipeline chunks as one module named like the whole
    model); ``optimizer``: its torch optimizer (None: weights only); ``zero``: the DeepSpeed
    engine when the optimizer state is DeepSpeed's; ``spread``: share the writing out over
    the data/context copies (else copy 0 writes everything); ``background``: saves are
    written by a writer process (``checkpoint.async``), whose collectives ``timeout_s``
    bounds."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        dims: ParallelDims,
        zero: ZeroEngine | None = None,
        spread: bool = True,
        background: bool = False,
        timeout_s: float = 600,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.dims = dims
        self.zero = zero
        self.spread = spread
        # checkpoint.async: saves are written and published by a writer process, from host
        # copies of the tensors in memory it shares (kept from save to save).
        self.writer = BackgroundWriter(timeout_s) if background else None
        # The sharding is checked on the first save and when it changes, not on every save
        # (by the writer process for background saves: it keeps its own check).
        self.sharding_check = ShardingCheck()
        self._closed_writer_checks = 0
        # Seconds of each part of the last save's blocking time (profiling: the bench).
        self.timings: dict[str, float] = {}

    def place(self) -> Place:
        """This rank's place for the sharded tensors: its tensor-parallel shard, which data x
        context copy it is, and, under pipeline parallelism, which keys are copies of another
        stage's (a tied head's embedding on the last stage)."""
        d = self.dims
        owns_embedding = d.is_first_stage

        def owner(key: str) -> int:
            return int(key == "embedding.weight" and not owns_embedding)

        return Place(d.tp_rank, d.tp_size, d.replica, d.replicas, owner)

    def sharded_state_dict(self) -> dict[str, Any]:
        """The model's (and, without ZeRO, the optimizer's) tensors as megatron-core sharded
        tensors, keyed by global names."""
        place = self.place()
        sharded = model_sharded_state_dict(self.model, place)
        if self._saves_optimizer:
            sharded |= optimizer_sharded_state_dict(self.optimizer, self.model, place)
        return spread_writes(sharded, place) if self.spread else sharded

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of ``sharded_state_dict`` by its keys, as they are (no megatron
        objects: cheap)."""
        tensors = {MODEL + k: v for k, v in model_tensors(self.model).items()}
        if self._saves_optimizer:
            tensors |= optimizer_tensors(self.optimizer, self.model)
        return tensors

    @property
    def _saves_optimizer(self) -> bool:
        """Whether the optimizer's tensors are ours to save (not DeepSpeed's)."""
        return self.optimizer is not None and self.zero is None

    def _template(self, state: dict[str, Any]) -> dict[str, Any]:
        """Tensors to load a checkpoint into, from its rank file's optimizer record."""
        place = self.place()
        template = model_sharded_state_dict(self.model, place, template=True)
        if self.optimizer is not None:
            template |= optimizer_sharded_state_dict(
                self.optimizer, self.model, place, state["optimizer"]
            )
        return template

    def _optimizer_record(self) -> dict[str, Any] | None:
        if not self._saves_optimizer:
            return None
        record = optimizer_record(self.optimizer, self.model)
        for key in ("shapes", "scalars"):  # every stage's, so any rank file will do
            record[key] = merge_over_stages(record[key], self.dims)
        return record

    def save(
        self,
        run_dir: Path,
        step: int,
        state: dict[str, Any],
        keep_last: int = 0,
        background: bool | None = None,
    ) -> float:
        """Writes the checkpoint of ``step`` (``state``: the caller's entries of this rank's
        file) and publishes it; returns the seconds the caller was blocked.

        In the background (the default with a writer; ``background=False`` forces a
        synchronous save, after the one in flight): the tensors are copied to host memory
        and the writer process writes and publishes them while training goes on. DeepSpeed's
        ZeRO files are written at once in either case (its engine writes them itself)."""
        start = time.perf_counter()
        background = self.writer is not None if background is None else background
        if self.writer is not None:
            self.writer.join()  # one save in flight at a time
        elif background:
            raise ValueError("a background save needs Checkpointer(background=True)")
        timings = {"wait_previous": time.perf_counter() - start}
        if background:
            with timed(timings, "wait_writer_start"):  # a save before the writer is up
                self.writer.await_ready()
        zero = self.zero
        with zero.gathered() if zero is not None else contextlib.nullcontext():
            # Whole parameters, also under ZeRO-3.
            with timed(timings, "state_dict"):
                record = self._optimizer_record()
                tensors = self._tensors() if background else None
                sharded = None if background else self.sharded_state_dict()
            if background:
                # Host copies of the tensors, and the sharded state dict only when their
                # layout changed (HostStaging: per-tensor Python kept off the step).
                sharded = self.writer.staging.stage(tensors, self.sharded_state_dict, timings)
        staged = stage_checkpoint(
            run_dir, step, {**state, "optimizer": record}, keep_last, self.dims.sizes(), sharded,
            None if zero is None else lambda folder: zero.save(folder / ZERO_DIR, ZERO_TAG),
            self.sharding_check,
        )  # fmt: skip
        with timed(timings, "submit" if background else "write"):
            if background:
                self.writer.submit(staged)
            else:
                write_checkpoint(staged)
        self.timings = {**timings, **staged.timings, "total": time.perf_counter() - start}
        return self.timings["total"]

    def wait(self) -> list[tuple[int, float]]:
        """Blocks until a background save in flight is published: (step, seconds its writing
        took) of each background save completed since the last call."""
        return self.writer.wait() if self.writer is not None else []

    def poll(self) -> list[tuple[int, float]]:
        """Like ``wait`` without blocking."""
        return self.writer.poll() if self.writer is not None else []

    @property
    def sharding_checks(self) -> int:
        """How many times megatron-core's sharding check ran for this checkpointer's saves
        (here and in its writer process)."""
        writer = self.writer.sharding_checks if self.writer is not None else 0
        return self.sharding_check.runs + self._closed_writer_checks + writer

    def close(self) -> None:
        """Waits for a background save in flight and releases the writer (collective); later
        saves are synchronous."""
        if self.writer is not None:
            try:
                self.writer.close()
            finally:
                self._closed_writer_checks += self.writer.sharding_checks
                self.writer = None

    def abort(self) -> None:
        """For a run that failed: stops the writer without waiting (a save in flight stays
        unpublished); later saves are synchronous. Not collective."""
        if self.writer is not None:
            self._closed_writer_checks += self.writer.sharding_checks
            self.writer.abort()
            self.writer = None

    def restore(self, run_dir: Path) -> Restored | None:
        """Loads the newest usable checkpoint of ``run_dir`` into the model and optimizer
        (resharded to this split); None when the run has none. A killed save's leftover
        ``step_X.tmp`` is deleted first."""
        if self.dims.is_main:
            remove_partial(run_dir)
        # Under ZeRO, DeepSpeed loads the model and optimizer from its own files.
        template = None if self.zero is not None else self._template
        loaded = load_latest(run_dir, self.dims.sizes(), template)
        if loaded is None:
            return None
        state, path = loaded
        restored = Restored(state, path, state["elastic"], state["saved_layout"])
        if self.zero is not None:
            if sizes_text(restored.saved_sizes) != sizes_text(self.dims.sizes()):
                raise ConfigError(
                    f"{path} holds ZeRO optimizer state of tensor x context x pipeline "
                    f"{sizes_text(restored.saved_sizes)}; a ZeRO run resumes on another "
                    "data-parallel size only: keep parallel.tensor, context and pipeline"
                )
            self.zero.load(path / ZERO_DIR, ZERO_TAG)
        else:
            load_model(self.model, state["sharded"])
            if self.optimizer is not None:
                load_optimizer(self.optimizer, self.model, state["optimizer"], state["sharded"])
        return restored

    def load_weights(self, ckpt: Path) -> None:
        """The model's weights from the checkpoint folder ``ckpt`` (any split), nothing else."""
        place = self.place()
        template = model_sharded_state_dict(self.model, place, template=True)
        load_model(self.model, load_sharded(ckpt / SHARDED, template))


def load_trained(
    run_dir: Path, device: torch.device | None = None, step: int | None = None
) -> tuple[Config, Tokenizer, nn.Module, int]:
    """(config, tokenizer, single-process model with the weights of checkpoint ``step``
    (default: the newest complete one), its step) of a run, whatever the split that trained
    it (the sharded tensors load whole). The tokenizer is the run's own (``run_tokenizer``:
    never a new one); the config returned names it where it was found."""
    from pretrain.build import model_for, select_device, tokenizer_for

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config_from_dict(parse_yaml(config_path.read_text()))
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    by_step = {int(p.name.removeprefix("step_")): p for p in checkpoints}
    step = max(by_step) if step is None else step
    if step not in by_step:
        steps = ", ".join(str(s) for s in sorted(by_step))
        raise ValueError(f"{run_dir} has no checkpoint of step {step} (it has: {steps})")
    ckpt = by_step[step]
    meta = read_meta(ckpt)
    verify_files(ckpt, meta)
    first = load_rank_file(ckpt, 0, meta)
    device = device or select_device(cfg)
    cfg = run_tokenizer(cfg, run_dir)
    tokenizer = tokenizer_for(cfg)
    model = model_for(cfg, tokenizer.vocab_size, torch.device("cpu"))
    Checkpointer(model, None, ParallelDims.single()).load_weights(ckpt)
    return cfg, tokenizer, model.to(device), int(first["train"]["step"])


def run_tokenizer(cfg: Config, run_dir: Path) -> Config:
    """``cfg`` (a run's saved config) with ``data.tokenizer.path`` where the run's
    sentencepiece model is; raises FileNotFoundError, naming the places looked in, when it
    is in none. ``tokenizer_for`` trains a missing model, which for a trained model would
    be a new vocabulary: the wrong ids, silently.

    A relative path is relative to the folder the run was launched from (as ``run.dir``
    is): the folder that holds ``run_dir`` as the config names it (``run.dir: runs/x``
    found at ``/p/runs/x``: ``/p``), else the working directory."""
    t = cfg.data.tokenizer
    if t.kind != "sentencepiece":
        return cfg
    path = Path(t.path)
    places = [path] if path.is_absolute() else [d / path for d in _launch_dirs(cfg, run_dir)]
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        looked = ", ".join(str(p) for p in places)
        raise FileNotFoundError(
            f"the run's tokenizer {t.path} is not there (looked for {looked}; "
            "data.tokenizer.path in its config.yaml); a trained model needs the tokenizer it "
            "was trained with"
        )
    tokenizer = dataclasses.replace(t, path=str(found))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))


def _launch_dirs(cfg: Config, run_dir: Path) -> list[Path]:
    """Where the run may have been launched from, likeliest first (see ``run_tokenizer``)."""
    named, found = cfg.run_dir, Path(run_dir).resolve()
    dirs = []
    n = len(named.parts)
    if not named.is_absolute() and 0 < n < len(found.parts) and found.parts[-n:] == named.parts:
        dirs.append(found.parents[n - 1])
    dirs.append(Path.cwd())
    return list(dict.fromkeys(dirs))
