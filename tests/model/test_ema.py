"""Tests of the damped EMA (pretrain/model/ema.py) against float64 references.

The references are written from the maths of the SeqBoat paper (arXiv:2306.11197), not by
calling the code under test: the sequential recurrence token by token, and the truncated
kernel as an explicit convolution loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.model.ema import DampedEMA
from pretrain.model.ema import _powers as ema_powers
from tests.model.reference import F64, rel_err


def make_ema(channels: int = 5, ndim: int = 6, truncation: int | None = None) -> DampedEMA:
    """A float64 EMA with spread-out parameters: some channels decay fast, some barely."""
    ema = DampedEMA(channels, ndim, truncation).double()
    with torch.no_grad():
        ema.delta.normal_(0.0, 2.0)
        ema.alpha.normal_(0.0, 2.0)
        ema.alpha[0] = -12.0  # q = 1 - p * sigmoid(-12) ~ 1: a very long memory
        ema.beta.normal_(0.0, 1.0)
        ema.eta.normal_(0.0, 1.0)
        ema.omega.normal_(0.0, 1.0)
    return ema


def ema_recurrence(ema: DampedEMA, x: torch.Tensor, state: torch.Tensor | None = None):
    """h_t = p*beta*x_t + q*h_{t-1}; y_t = sum_n eta*h_t/sqrt(N) + omega*x_t (token loop)."""
    length, batch, channels = x.shape
    p = torch.sigmoid(ema.delta)  # differentiable: the tests compare parameter gradients too
    q = 1.0 - p * torch.sigmoid(ema.alpha)
    beta, eta, omega = ema.beta, ema.eta, ema.omega
    n = ema.ndim
    h = torch.zeros(batch, channels, n, dtype=F64) if state is None else state.clone()
    ys = []
    for t in range(length):
        h = p * beta * x[t].unsqueeze(-1) + q * h
        ys.append((eta * h).sum(-1) / math.sqrt(n) + omega * x[t])
    return torch.stack(ys), h


def ema_truncated_reference(ema: DampedEMA, x: torch.Tensor, trunc: int) -> torch.Tensor:
    """y_t = sum_{l < trunc} K_l x_{t-l} + omega x_t, K_l = sum_n eta p beta q^l / sqrt(N)."""
    p = torch.sigmoid(ema.delta.detach())
    q = 1.0 - p * torch.sigmoid(ema.alpha.detach())
    coef = ema.eta.detach() * p * ema.beta.detach() / math.sqrt(ema.ndim)  # [C, N]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for lag in range(min(trunc, t + 1)):
            y[t] += (coef * q**lag).sum(-1) * x[t - lag]
    return y + ema.omega.detach() * x


def uneven_splits(length: int) -> list[int]:
    """Chunk sizes summing to ``length``: 1, then growing odd sizes, then the rest."""
    sizes, left, nxt = [], length, 1
    while left > 0:
        take = min(nxt, left)
        sizes.append(take)
        left -= take
        nxt = nxt * 3 + 2
    return sizes


@pytest.mark.parametrize("length", [1, 7, 64, 100, 257])
def test_ema_fft_step_scan_match_recurrence(length):
    ema = make_ema()
    x = torch.randn(length, 3, ema.channels)
    ref, h_last = ema_recurrence(ema, x)
    with torch.no_grad():
        y_fft = ema(x)
        # step, token by token
        state = ema.initial_state(3, x.device, F64)
        steps = []
        for t in range(length):
            y_t, state = ema.step(x[t], state)
            steps.append(y_t)
        y_step = torch.stack(steps)
        # scan_chunk over uneven chunks, carrying the state
        sizes = uneven_splits(length)
        chunks, carried, start = [], None, 0
        for size in sizes:
            y_c, carried = ema.scan_chunk(x[start : start + size], carried)
            chunks.append(y_c)
            start += size
        y_scan = torch.cat(chunks)
    assert y_fft.dtype == F64 and y_fft.shape == x.shape
    assert rel_err(y_fft, ref) < 1e-10
    assert rel_err(y_step, ref) < 1e-10
    assert rel_err(y_scan, ref) < 1e-10
    assert rel_err(state, h_last) < 1e-10
    assert rel_err(carried, h_last) < 1e-10
    if length > 1:
        assert len(sizes) > 1


def test_ema_scan_chunk_with_initial_state():
    ema = make_ema()
    x = torch.randn(23, 2, ema.channels)
    state0 = torch.randn(2, ema.channels, ema.ndim)
    ref, h_last = ema_recurrence(ema, x, state0)
    with torch.no_grad():
        y, final = ema.scan_chunk(x, state0)
    assert rel_err(y, ref) < 1e-10
    assert rel_err(final, h_last) < 1e-10


def test_ema_untruncated_and_truncated():
    x = torch.randn(257, 2, 5)
    full = make_ema(truncation=None)
    ref, _ = ema_recurrence(full, x)
    with torch.no_grad():
        y_full = full(x)
    assert rel_err(y_full, ref) < 1e-10
    # Channel 0 has q ~ 1, so cutting the kernel at 16 taps must change the output a lot ...
    trunc = make_ema(truncation=16)
    trunc.load_state_dict(full.state_dict())
    with torch.no_grad():
        y_trunc = trunc(x)
    assert rel_err(y_trunc, ref) > 1e-3
    # ... and the truncated output is the 16-tap convolution.
    x_short = x[:40]
    with torch.no_grad():
        y_short = trunc(x_short)
    assert rel_err(y_short, ema_truncated_reference(trunc, x_short, 16)) < 1e-10
    # A truncation longer than the sequence is no truncation.
    long_trunc = make_ema(truncation=10_000)
    long_trunc.load_state_dict(full.state_dict())
    with torch.no_grad():
        assert rel_err(long_trunc(x), ref) < 1e-10


@pytest.mark.parametrize("batch", [1, 2])  # one sequence: the rows' 2-D transposes
@pytest.mark.parametrize(
    ("length", "chunk"), [(100, 7), (257, 64), (257, 256), (64, 64), (300, 0), (100, 0)]
)
def test_ema_chunked_convolution_matches_recurrence(length, chunk, batch):
    """Training's chunked convolution (a Toeplitz matmul up to MATMUL_CONV_MAX tokens per
    chunk, an FFT above; states carried between chunks) is the untruncated EMA, in its
    output and in the gradients of its input and of every parameter."""
    x = torch.randn(length, batch, 5, requires_grad=True)
    ema = make_ema(truncation=None)
    chunked = DampedEMA(5, ema.ndim, None, chunk)
    chunked.load_state_dict(ema.state_dict())
    ref, _ = ema_recurrence(ema, x)
    y = chunked(x)
    assert rel_err(y, ref) < 1e-10
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), [x, *ema.parameters()])
    grads = torch.autograd.grad(y.pow(2).sum(), [x, *chunked.parameters()])
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(grad, grad_ref) < 1e-10
    # With a carried-in state: outputs and the final state (the last chunk may be padded).
    state = torch.randn(batch, 5, ema.ndim, dtype=F64)
    ref, h_last = ema_recurrence(ema, x.detach(), state)
    y, final = chunked.scan_chunk(x.detach(), state)
    assert rel_err(y, ref) < 1e-10 and rel_err(final, h_last) < 1e-10


def test_ema_gradient_matches_recurrence():
    ema = make_ema(channels=3, ndim=4)
    x = torch.randn(19, 2, 3, requires_grad=True)
    w = torch.randn(19, 2, 3)
    (ema(x) * w).sum().backward()
    g_fft = x.grad.clone()
    x.grad = None
    ref, _ = ema_recurrence(ema, x)
    (ref * w).sum().backward()
    assert rel_err(g_fft, x.grad) < 1e-10


@pytest.mark.parametrize(
    ("truncation", "chunk"), [(None, 0), (None, 16), (24, 0)], ids=["fft", "chunked", "truncated"]
)
def test_ema_runs_in_float32_under_bf16_autocast(truncation, chunk):
    """Under bf16 autocast (train.precision=bf16) the EMA's kernel, state response and FFT
    stay float32: its output and gradients equal the float32 EMA's, not bf16-rounded ones."""
    ema = make_ema(truncation=truncation).float()
    ema.chunk = chunk
    x = torch.randn(50, 3, 5, dtype=torch.float32, requires_grad=True)
    state = torch.randn(3, 5, 6, dtype=torch.float32)

    def run(autocast: bool):
        ema.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ema(x)
            y_scan, final = ema.scan_chunk(x, state)
            y_step, next_state = ema.step(x[0], state)
        assert y.dtype == y_scan.dtype == y_step.dtype == torch.float32
        (y.square().sum() + y_scan.sum() + final.sum() + y_step.sum() + next_state.sum()).backward()
        grads = [x.grad.clone(), *(p.grad.clone() for p in ema.parameters())]
        return [y, y_scan, final, y_step, next_state, *grads]

    exact, autocast = run(False), run(True)
    errors = [rel_err(a.double(), b.double()) for a, b in zip(autocast, exact, strict=True)]
    assert max(errors) < 1e-6, errors


def test_ema_powers_have_no_subnormal_floats():
    """q^l below float32's smallest normal number is exact zero: on a CPU, subnormal floats
    made the EMA's exp and every product touching them 10-30x slower."""
    ema = make_ema(truncation=None).float()
    ema.chunk = 1024
    _, q, _ = ema.coefficients(torch.float32)
    powers = ema_powers(q, torch.arange(1024))
    tiny = torch.finfo(torch.float32).tiny
    assert (powers == 0).any(), "the test needs a kernel that decays below float32's range"
    assert bool(((powers == 0) | (powers >= tiny)).all())
