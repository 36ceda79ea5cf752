"""Tests of the gated attention unit (pretrain/model/gau.py) against float64 references.

The references (tests/model_reference.py) are written from the maths of the SeqBoat paper
(arXiv:2306.11197), not by calling the code under test: dense [M, M] masked local attention
and the whole GAU from its weights.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.model.gau import GatedAttentionUnit
from tests.model.reference import dense_attention_reference, gau_reference, rel_err

# (window, query block): blocks of the window's size, smaller ones dividing it and not.
WINDOW_BLOCKS = [(1, 1), (3, 3), (8, 8), (8, 2), (8, 3), (3, 1)]


def make_gau(window, attention_fn, position, width=6, zdim=4, hdim=5, max_positions=7, block=None):
    gau = GatedAttentionUnit(
        width, zdim, hdim, window, attention_fn, position, max_positions=max_positions,
        block=window if block is None else block,
    ).double()  # fmt: skip
    with torch.no_grad():  # big enough that scores and biases matter
        for p in gau.parameters():
            p.normal_(0.0, 0.7)
    return gau


def increasing_positions(length: int, batch: int) -> torch.Tensor:
    return torch.cumsum(torch.randint(1, 4, (length, batch)), 0)


def general_valid(length: int) -> torch.Tensor:
    """Columns: all valid, none valid, random (holes anywhere), valid prefix."""
    rand = torch.rand(length) < 0.6
    prefix = torch.arange(length) < max(length - 3, 1)
    cols = [torch.ones(length, dtype=torch.bool), torch.zeros(length, dtype=torch.bool)]
    return torch.stack([*cols, rand, prefix], dim=1)


@pytest.mark.parametrize(("window", "block"), WINDOW_BLOCKS)
@pytest.mark.parametrize("length", [1, 2, 5, 17])
@pytest.mark.parametrize("position", ["none", "simple", "local"])
@pytest.mark.parametrize("attention_fn", ["softmax", "relu2"])
def test_local_attention_matches_dense(window, block, length, position, attention_fn):
    gau = make_gau(window, attention_fn, position, block=block)
    batch = 4
    q, k = torch.randn(length, batch, 4), torch.randn(length, batch, 4)
    v = torch.randn(length, batch, 5)
    positions = increasing_positions(length, batch)
    valid = general_valid(length)
    with torch.no_grad():
        out, _ = gau.local_attention(q, k, v, positions, valid)
    ref = dense_attention_reference(gau, q, k, v, positions, valid)
    assert out.shape == (length, batch, 5)
    assert torch.isfinite(out).all()
    rows = valid.unsqueeze(-1).expand_as(out)  # column 0 is all valid: never empty
    assert rel_err(out[rows], ref[rows]) < 1e-10


@pytest.mark.parametrize(("window", "block"), WINDOW_BLOCKS)
def test_local_attention_attended_set(window, block):
    """With q = 0 softmax is uniform over the attended set; v = one-hot slots reveals it:
    exactly the valid slots j with i - w <= j <= i (empty slots inside the window count)."""
    gau = make_gau(window, "softmax", "none", block=block)
    length, batch = 20, 4
    valid = general_valid(length)
    q = torch.zeros(length, batch, 4)
    k = torch.randn(length, batch, 4)
    v = torch.eye(length).unsqueeze(1).expand(-1, batch, -1).contiguous()
    with torch.no_grad():
        out, stats = gau.local_attention(q, k, v, increasing_positions(length, batch), valid, True)
    pairs = 0
    for b in range(batch):
        for i in range(length):
            if not valid[i, b]:
                continue
            attended = [j for j in range(max(0, i - window), i + 1) if valid[j, b]]
            expected = torch.zeros(length)
            expected[attended] = 1.0 / len(attended)
            assert torch.allclose(out[i, b], expected, rtol=0, atol=1e-15), (b, i)
            assert torch.all(out[i, b][expected == 0] == 0)
            pairs += len(attended)
    assert int(stats.pairs) == pairs


@pytest.mark.parametrize(("window", "block"), WINDOW_BLOCKS)
@pytest.mark.parametrize("position", ["rotary", "simple", "local", "none"])
@pytest.mark.parametrize("attention_fn", ["softmax", "relu2"])
def test_gau_forward_matches_reference(window, block, position, attention_fn):
    """The GAU as the layer calls it: left-packed valid prefixes, zeros / position 0 in the
    empty slots, original positions of the packed tokens."""
    gau = make_gau(window, attention_fn, position, block=block)
    for length in (2, 13):
        counts = [length, 0, min(3, length), length - 1]
        batch = len(counts)
        valid = torch.arange(length).unsqueeze(1) < torch.tensor(counts).unsqueeze(0)
        m = torch.randn(length, batch, 6) * valid.unsqueeze(-1)
        positions = increasing_positions(length, batch) * valid
        with torch.no_grad():
            out, _ = gau(m, positions, valid)
            ref = gau_reference(gau, m, positions, valid)
        rows = valid.unsqueeze(-1).expand_as(out)
        assert torch.isfinite(out).all()
        assert rel_err(out[rows], ref[rows]) < 1e-10


def test_rotary_positions_matter():
    """Guard for the rotary reference: shifting all positions by a constant leaves the
    attention unchanged (relative), a non-uniform change does not."""
    gau = make_gau(3, "softmax", "rotary")
    m = torch.randn(9, 1, 6)
    valid = torch.ones(9, 1, dtype=torch.bool)
    pos = increasing_positions(9, 1)
    with torch.no_grad():
        a, _ = gau(m, pos, valid)
        b, _ = gau(m, pos + 37, valid)
        c, _ = gau(m, pos * 2, valid)
    assert rel_err(b, a) < 1e-10
    assert rel_err(c, a) > 1e-4


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("position", ["rotary", "none"])
@pytest.mark.parametrize(("window", "block"), WINDOW_BLOCKS)
def test_fused_kernel_equals_the_reference_path(dtype, tolerance, position, window, block):
    """The fused kernel (scaled_dot_product_attention) and the path that builds the score
    blocks give the same outputs on every valid slot and the same gradients of everything."""
    gau = make_gau(window, "softmax", position, block=block).to(dtype)
    length, batch = 21, 4
    valid = general_valid(length)
    m = (torch.randn(length, batch, 6, dtype=dtype) * valid.unsqueeze(-1)).requires_grad_()
    positions = increasing_positions(length, batch) * valid
    weights = torch.randn(length, batch, 6, dtype=dtype) * valid.unsqueeze(-1)

    def run(fused: bool) -> list[torch.Tensor]:
        gau.fused = fused
        assert gau.uses_fused_kernel() == fused
        gau.zero_grad(set_to_none=True)
        m.grad = None
        out, _ = gau(m, positions, valid)
        assert torch.isfinite(out).all()
        (out * weights).sum().backward()
        rows = valid.unsqueeze(-1).expand_as(out)
        return [out.detach()[rows], m.grad.clone(), *(p.grad.clone() for p in gau.parameters())]

    fused, reference = run(True), run(False)
    errors = [rel_err(a, b) for a, b in zip(fused, reference, strict=True)]
    assert max(errors) < tolerance, errors


def test_fused_kernel_only_where_it_applies():
    """relu2, the learned positional biases and attention dropout in training keep the
    reference path."""
    assert not make_gau(3, "relu2", "rotary").uses_fused_kernel()
    assert not make_gau(3, "softmax", "simple").uses_fused_kernel()
    assert not make_gau(3, "softmax", "local").uses_fused_kernel()
    gau = make_gau(3, "softmax", "rotary")
    gau.attention_dropout.p = 0.1
    assert not gau.train().uses_fused_kernel()
    assert gau.eval().uses_fused_kernel()


def test_window_keys_are_views_of_the_sequence():
    """The w + b keys and values of each window are views of one padded copy of k and v
    (stored once), not (w + b) / b copies: the planner's memory model counts them once."""
    from pretrain.model.gau import Windows

    length, batch, window, block = 37, 3, 8, 2
    q, k = torch.randn(length, batch, 4), torch.randn(length, batch, 4)
    v = torch.randn(length, batch, 5)
    valid = torch.ones(length, batch, dtype=torch.bool)
    positions = torch.arange(length).unsqueeze(1).expand(length, batch)
    sequences = Windows.cut(q, k, v, positions, valid, valid, window, block)
    assert len(sequences) == batch
    for name, whole in (("k", k), ("v", v)):
        views = [getattr(w, name) for w in sequences]
        storages = {t.untyped_storage().data_ptr() for t in views}
        assert len(storages) == 1, name
        padded = (window + 38) * batch * whole.shape[-1] * whole.element_size()  # 37 -> 38
        assert views[0].untyped_storage().nbytes() == padded
        assert views[0].shape == (19, window + block, whole.shape[-1])
