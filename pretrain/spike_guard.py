"""Skipping loss and gradient-norm spikes (the idea of OLMo-core's skip-step optimizer).

A step whose loss or gradient norm lies more than ``k`` standard deviations above the mean of
the last ``window`` applied steps leaves the weights alone, like a non-finite step: its batch
and its place in the schedule are consumed. The statistics only start once a window is full,
and only applied steps enter them. Every rank sees the same global loss and norm, so every
rank takes the same decision; the window is saved in checkpoints (resume stays exact).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class SpikeGuard:
    def __init__(self, k: float, window: int) -> None:
        if k <= 0 or window < 2:
            raise ValueError(f"spike guard needs k > 0 and a window >= 2, got {k}, {window}")
        self.k = k
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)

    def is_spike(self, loss: float, norm: float | None = None) -> bool:
        """Whether this step's ``loss`` (or ``norm``, when known) is a spike."""
        if len(self.losses) < (self.losses.maxlen or 0):
            return False
        checks = [(loss, self.losses)] + ([(norm, self.norms)] if norm is not None else [])
        return any(value > _mean(past) + self.k * _std(past) for value, past in checks)

    def record(self, loss: float, norm: float) -> None:
        """An applied step."""
        self.losses.append(loss)
        self.norms.append(norm)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.norms.clear()
        self.losses.extend(state["losses"])
        self.norms.extend(state["norms"])


def _mean(values: deque[float]) -> float:
    return sum(values) / len(values)


def _std(values: deque[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
