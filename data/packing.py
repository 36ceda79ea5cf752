"""Documents -> fixed-length training samples, Megatron GPT style."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Packer:
    """Concatenates documents, each followed by ``eos_id``, and cuts samples of
    ``seq_length + 1`` tokens from the stream.

    Sample ``i`` is stream tokens ``[i * seq_length, (i + 1) * seq_length + 1)``: consecutive
    samples share one token, so that every stream token is a prediction target exactly once
    (inputs ``sample[:-1]``, targets ``sample[1:]``).
    """

    def __init__(self, seq_length: int, eos_id: int) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.seq_length = seq_length
        self.eos_id = eos_id
        self._buffer: list[int] = []  # stream tokens not yet fully consumed as targets

    def push(self, tokens: Sequence[int]) -> None:
        """Append one document."""
        self._buffer.extend(tokens)
        self._buffer.append(self.eos_id)

    def has_sample(self) -> bool:
        return len(self._buffer) > self.seq_length

    def pop(self) -> list[int]:
        """The next sample; call only when :meth:`has_sample`."""
        if not self.has_sample():
            raise RuntimeError("Packer.pop() needs seq_length + 1 buffered tokens")
        sample = self._buffer[: self.seq_length + 1]
        del self._buffer[: self.seq_length]  # keep the shared token
        return sample

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buffer": torch.tensor(self._buffer, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._buffer = state["buffer"].tolist()
