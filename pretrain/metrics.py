"""What the loop logs every ``train.log_interval`` steps, averaged over that window.

Step time is measured on every step and split into the wait for the data loader and the
step itself; throughput is the window's tokens over the window's time (a single step's time
would be the one that also collects layer statistics). Model FLOPs are counted
dense-equivalent and at the measured activation ratios (``pretrain/flops.py``).
"""

from __future__ import annotations

import math
import resource

import torch

from pretrain.config import Config
from pretrain.flops import training_flops_per_token
from pretrain.layer_stats import LayerSummary


class StepMetrics:
    """Collects the steps of one log window; ``summary`` reports and starts a new window."""

    def __init__(self, cfg: Config, padded_vocab: int, world_size: int) -> None:
        self.cfg, self.padded_vocab, self.world_size = cfg, padded_vocab, world_size
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.steps = 0
        self.step_s = 0.0
        self.data_s = 0.0

    def record(self, loss: float, step_s: float, data_s: float) -> None:
        """One step: its loss (left out of the mean if non-finite), its whole time and the
        part of it spent waiting for the batch."""
        if math.isfinite(loss):
            self.losses.append(loss)
        self.steps += 1
        self.step_s += step_s
        self.data_s += data_s

    def summary(self, stats: list[LayerSummary] | None, device: torch.device) -> dict[str, float]:
        seconds = max(self.step_s, 1e-9)
        out = {
            "train/loss": sum(self.losses) / max(len(self.losses), 1),
            "train/step_time_s": seconds / max(self.steps, 1),
            "train/data_wait_fraction": self.data_s / seconds,
            **self._throughput(self.tokens_per_step * self.steps / seconds, stats),
            "perf/max_memory_mib": max_memory_mib(device),
            **layer_metrics(stats),
        }
        self._reset()
        return out

    def _throughput(self, tokens_per_s: float, stats: list[LayerSummary] | None) -> dict:
        """Tokens/s (total and per rank), model TFLOP/s counted dense-equivalent and at the
        measured activation ratios, MFU when ``train.peak_tflops`` is set."""
        cfg = self.cfg
        ratios = [s.ratio for s in stats] if stats else None
        length = cfg.train.seq_length
        per_token = {
            "dense": training_flops_per_token(cfg.model, self.padded_vocab, length),
            "activated": training_flops_per_token(cfg.model, self.padded_vocab, length, ratios),
        }
        out = {
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_rank": tokens_per_s / self.world_size,
        }
        for kind, flops in per_token.items():
            out[f"perf/tflops_{kind}"] = flops * tokens_per_s / 1e12
            if cfg.train.peak_tflops > 0:
                peak = cfg.train.peak_tflops * self.world_size
                out[f"perf/mfu_{kind}"] = out[f"perf/tflops_{kind}"] / peak
        return out


def layer_metrics(stats: list[LayerSummary] | None) -> dict[str, float]:
    """Per layer, over the run's global batch: the activation ratio, the mean attention span
    in original positions and, with dispatch, the attention-work imbalance before and after
    balancing."""
    out: dict[str, float] = {}
    for i, s in enumerate(stats or []):
        out[f"layer_{i}/act_ratio"] = s.ratio
        out[f"layer_{i}/attn_span"] = s.span
        if s.imbalance is not None:
            out[f"layer_{i}/work_imbalance_before"], out[f"layer_{i}/work_imbalance_after"] = (
                s.imbalance
            )
    return out


def max_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
