"""Host memory shared with the checkpoint writer (``pretrain/host_memory.py``): a tensor in it
crosses ``dumps``/``loads`` by place (the other mapping sees the same bytes, views keep
their offsets and strides), any other tensor by value; the same layout keeps its buffers, a
new one gets a new memory file, and a place of an old one is refused."""

from __future__ import annotations

import pytest
import torch

from pretrain.host_memory import HostMemory, dumps, loads

SPECS = {"a": (torch.Size([3, 5]), torch.float32), "b": (torch.Size([7]), torch.float64)}


def _writer_side(memory: HostMemory) -> HostMemory:
    """A second mapping of ``memory``'s new file, as the writer process maps it."""
    fd, size = memory.take_new_file()
    other = HostMemory()
    other.attach(memory.generation, fd, size)
    return other


def test_tensors_in_the_memory_cross_by_place_others_by_value() -> None:
    memory = HostMemory()
    buffers = memory.buffers(SPECS)
    buffers["a"].copy_(torch.arange(15.0).view(3, 5))
    buffers["b"].copy_(torch.arange(7.0, dtype=torch.float64))
    writer = _writer_side(memory)
    outside = torch.ones(1000)
    obj = {"a": buffers["a"], "view": buffers["a"][1:, ::2], "b": buffers["b"], "x": outside}
    data = dumps(obj, memory)
    assert len(data) < outside.numel() * 4 + 1000  # only the outside tensor's bytes travel
    got = loads(data, writer)
    for key in obj:
        assert got[key].dtype == obj[key].dtype and torch.equal(got[key], obj[key])
    assert got["view"].stride() == obj["view"].stride()
    buffers["a"][2, 4] = -1.0  # the same memory: the writer sees the change
    assert got["a"][2, 4] == -1.0 and got["view"][1, 2] == -1.0
    got["x"][0] = 5.0  # a copy: the original is untouched
    assert outside[0] == 1.0


def test_a_new_layout_gets_a_new_memory_file() -> None:
    memory = HostMemory()
    first = memory.buffers(SPECS)
    writer = _writer_side(memory)
    assert memory.buffers(dict(SPECS)) is first and memory.take_new_file() is None
    second = memory.buffers({**SPECS, "c": (torch.Size([2]), torch.float32)})
    assert second["a"].data_ptr() != first["a"].data_ptr()
    with pytest.raises(RuntimeError, match="shared memory 2"):  # the writer maps generation 1
        loads(dumps(second["c"], memory), writer)
    assert torch.equal(loads(dumps(second["c"], memory), _writer_side(memory)), second["c"])
