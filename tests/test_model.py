"""Unit tests of the SeqBoat model against independent float64 reference computations.

Every reference below is written from the maths of the SeqBoat paper (arXiv:2306.11197), not
by calling the code under test: sequential recurrences for the EMA, Python loops / dense
[M, M] masked attention for the GAU, explicit gathers for compress / extract.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pretrain.config import ModelConfig
from pretrain.model.ema import DampedEMA
from pretrain.model.gau import GatedAttentionUnit
from pretrain.model.layer import SeqBoatLayer
from pretrain.model.lm import LanguageModel
from pretrain.model.router import Router, compress, extract, plan_compression

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is as fast, and far faster when other
    processes share the cores (OpenMP threads then spin against each other)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """float64 by default (restored afterwards) and a fixed seed for every test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        layers=2, width=16, zdim=8, hdim=16, ndim=4, window=4, max_positions=32,
        vocab_multiple=8, transformer_heads=2, transformer_ffn=32,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


# =========================================================================== EMA


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
    p = torch.sigmoid(ema.delta.detach())
    q = 1.0 - p * torch.sigmoid(ema.alpha.detach())
    beta, eta, omega = ema.beta.detach(), ema.eta.detach(), ema.omega.detach()
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


@pytest.mark.parametrize(("length", "chunk"), [(100, 7), (257, 64), (257, 256), (64, 64)])
def test_ema_chunked_convolution_matches_recurrence(length, chunk):
    """Training's chunked FFT (states carried between chunks) is the untruncated EMA."""
    x = torch.randn(length, 2, 5, requires_grad=True)
    ema = make_ema(truncation=None)
    chunked = DampedEMA(5, ema.ndim, None, chunk)
    chunked.load_state_dict(ema.state_dict())
    ref, _ = ema_recurrence(ema, x)
    y = chunked(x)
    assert rel_err(y, ref) < 1e-10
    (grad_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    (grad,) = torch.autograd.grad(y.pow(2).sum(), x)
    assert rel_err(grad, grad_ref) < 1e-10
    # With a carried-in state: outputs and the final state (the last chunk may be padded).
    state = torch.randn(2, 5, ema.ndim, dtype=F64)
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


# ============================================================ compress / extract


def random_activation(length: int, counts: list[int], gen: torch.Generator) -> torch.Tensor:
    """[L, B] bool with exactly counts[b] activated tokens at random positions in column b."""
    act = torch.zeros(length, len(counts), dtype=torch.bool)
    for b, c in enumerate(counts):
        act[torch.randperm(length, generator=gen)[:c], b] = True
    return act


@pytest.mark.parametrize(
    "counts",
    [[3, 0, 11, 7], [0, 0, 0], [11, 11], [1, 11, 5], [5]],
    ids=["ragged", "none", "all", "mixed", "single"],
)
def test_compress_extract_round_trip(counts):
    length, dim = 11, 3
    gen = torch.Generator().manual_seed(1)
    act = random_activation(length, counts, gen)
    x = torch.randn(length, len(counts), dim)
    plan = plan_compression(act)
    m_expected = max(max(counts), 1)
    assert plan.length == m_expected
    assert plan.counts.tolist() == counts
    xc = compress(x, plan)
    pos = compress(torch.arange(length).unsqueeze(1).expand(-1, len(counts)), plan)
    assert xc.shape == (m_expected, len(counts), dim)
    assert pos.dtype == torch.long
    for b, c in enumerate(counts):
        idx = torch.nonzero(act[:, b]).flatten()  # time order
        assert plan.valid[:, b].tolist() == [j < c for j in range(m_expected)]
        assert torch.equal(plan.index[:c, b], idx)
        assert torch.equal(xc[:c, b], x[idx, b])
        assert torch.equal(pos[:c, b], idx)
        assert torch.all(xc[c:, b] == 0)  # empty slots exactly zero
        assert torch.all(pos[c:, b] == 0)
    back = extract(xc, plan)
    assert back.shape == x.shape
    assert torch.equal(back, torch.where(act.unsqueeze(-1), x, torch.zeros_like(x)))


def test_compress_none_and_all_activated():
    length, batch = 9, 2
    x = torch.randn(length, batch, 4)
    none = plan_compression(torch.zeros(length, batch, dtype=torch.bool))
    assert none.length == 1 and not none.valid.any()
    assert torch.equal(compress(x, none), torch.zeros(1, batch, 4))
    assert torch.equal(extract(torch.randn(1, batch, 4), none), torch.zeros_like(x))
    every = plan_compression(torch.ones(length, batch, dtype=torch.bool))
    assert every.length == length and every.valid.all()
    assert torch.equal(every.index, torch.arange(length).unsqueeze(1).expand(-1, batch))
    assert torch.equal(compress(x, every), x)
    assert torch.equal(extract(x, every), x)


def test_extract_ignores_empty_slots():
    """Whatever sits in empty slots never reaches any original position."""
    gen = torch.Generator().manual_seed(2)
    act = random_activation(13, [2, 9, 0], gen)
    plan = plan_compression(act)
    y = torch.randn(plan.length, 3, 2)
    y_garbage = torch.where(plan.valid.unsqueeze(-1), y, torch.full_like(y, 1e30))
    out = extract(y_garbage, plan)
    for b in range(3):
        idx = torch.nonzero(act[:, b]).flatten()
        expected = torch.zeros(13, 2)
        expected[idx] = y[: len(idx), b]
        assert torch.equal(out[:, b], expected)


def test_compress_extract_gradients():
    gen = torch.Generator().manual_seed(3)
    act = random_activation(12, [4, 0, 12, 7], gen)
    plan = plan_compression(act)
    x = torch.randn(12, 4, 3, requires_grad=True)
    w = torch.randn(plan.length, 4, 3)
    (compress(x, plan) * w).sum().backward()
    for b in range(4):
        idx = torch.nonzero(act[:, b]).flatten()
        expected = torch.zeros(12, 3)
        expected[idx] = w[: len(idx), b]
        assert torch.equal(x.grad[:, b], expected)  # skipped tokens: exactly 0
    # extract: empty slots get exactly zero gradient, slot j gets its token's gradient
    y = torch.randn(plan.length, 4, 3, requires_grad=True)
    w2 = torch.randn(12, 4, 3)
    (extract(y, plan) * w2).sum().backward()
    for b in range(4):
        idx = torch.nonzero(act[:, b]).flatten()
        expected = torch.zeros(plan.length, 3)
        expected[: len(idx)] = w2[idx, b]
        assert torch.equal(y.grad[:, b], expected)


# ======================================================================== router


def test_router_decision_independent_of_temperature():
    router = Router(16).double()
    u = torch.randn(50, 3, 2)
    reference = u[..., 1] > u[..., 0]
    assert reference.any() and (~reference).any()
    gates = []
    for log_temp in (-8.0, -2.0, 0.0, 1.0, 3.0, 9.0):
        with torch.no_grad():
            router.log_temp.fill_(log_temp)
            activated, gate = router(u)
        assert activated.dtype == torch.bool
        assert torch.equal(activated, reference)
        tau = math.exp(log_temp)
        expected = torch.sigmoid((u[..., 1] - u[..., 0]) / tau) * reference
        assert torch.allclose(gate, expected, rtol=1e-12, atol=1e-15)
        assert torch.all(gate[~reference] == 0)
        assert torch.all(gate[reference] >= 0.5)
        gates.append(gate)
    assert not torch.allclose(gates[0], gates[-1])  # the temperature does change the gate
    # the initial temperature is init_temp_scale * sqrt(width)
    assert math.isclose(Router(16, init_temp_scale=0.3).log_temp.exp().item(), 0.3 * 4.0)


def test_router_ties_go_to_skip_and_act_bias():
    router = Router(4, act_bias=0.0).double()
    u = torch.tensor([[0.3, 0.3], [0.0, 0.0], [-1.0, -1.0]])
    activated, gate = router(u)
    assert not activated.any() and torch.all(gate == 0)
    u = torch.randn(200, 2)
    diff = u[:, 1] - u[:, 0]
    for bias in (-0.7, 0.0, 0.4):
        router = Router(4, act_bias=bias).double()
        activated, gate = router(u)
        assert torch.equal(activated, diff > bias)
        tau = router.log_temp.exp().item()
        assert torch.allclose(gate, torch.sigmoid((diff - bias) / tau) * (diff > bias))
    # exact tie with the bias: skip
    router = Router(4, act_bias=0.5).double()
    activated, _ = router(torch.tensor([[0.25, 0.75], [0.0, 0.5000001]]))
    assert activated.tolist() == [False, True]
    # large biases switch everything off / on
    assert not Router(4, act_bias=1e6).double()(u)[0].any()
    assert Router(4, act_bias=-1e6).double()(u)[0].all()


def test_router_gradient_only_through_gate_at_activated_tokens():
    router = Router(9, act_bias=0.2).double()
    with torch.no_grad():
        router.log_temp.fill_(0.3)
    u = torch.randn(40, 2, 2, requires_grad=True)
    activated, gate = router(u)
    assert not activated.requires_grad
    c = torch.randn(40, 2)
    (gate * c).sum().backward()
    tau = math.exp(0.3)
    d = u[..., 1].detach() - u[..., 0].detach() - 0.2
    pi = torch.sigmoid(d / tau)
    dgate = pi * (1 - pi) / tau * activated
    assert torch.equal(u.grad[~activated], torch.zeros_like(u.grad[~activated]))
    assert torch.all(u.grad[activated].abs() > 0)
    assert torch.allclose(u.grad[..., 1], c * dgate, rtol=1e-10, atol=1e-14)
    assert torch.allclose(u.grad[..., 0], -c * dgate, rtol=1e-10, atol=1e-14)
    dtemp = (c * (-pi * (1 - pi) * d / tau) * activated).sum()
    assert torch.allclose(router.log_temp.grad, dtemp, rtol=1e-10)


def _layer_logit_grads(detach_gate: bool):
    torch.manual_seed(5)
    layer = SeqBoatLayer(small_cfg(routing="sparse")).double()
    captured = {}

    def keep_projection(_mod, _inp, out):
        out.retain_grad()
        captured["proj"] = out

    def detach(_mod, _inp, out):
        captured["activated"] = out[0]
        return (out[0], out[1].detach()) if detach_gate else out

    layer.hx_proj.register_forward_hook(keep_projection)
    layer.router.register_forward_hook(detach)
    x = torch.randn(30, 3, 16)
    y, _ = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    return layer, captured["proj"].grad, captured["activated"]


def test_layer_router_gets_gradient_only_through_gate():
    layer, proj_grad, activated = _layer_logit_grads(detach_gate=False)
    assert activated.any() and (~activated).any()
    logit_grad = proj_grad[..., :2]
    assert torch.all(logit_grad[~activated] == 0)
    assert torch.all(logit_grad[activated].abs() > 0)
    assert layer.router.log_temp.grad.abs() > 0
    assert layer.hx_proj.weight.grad[:2].abs().max() > 0
    # Gate detached: no other path reaches the routing logits or the temperature.
    layer, proj_grad, _ = _layer_logit_grads(detach_gate=True)
    assert torch.all(proj_grad[..., :2] == 0)
    assert layer.router.log_temp.grad is None or torch.all(layer.router.log_temp.grad == 0)
    assert torch.all(layer.hx_proj.weight.grad[:2] == 0)
    assert torch.all(layer.hx_proj.bias.grad[:2] == 0)
    assert layer.hx_proj.weight.grad[2:].abs().max() > 0


# ====================================================================== GAU


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Pairs (x[2i], x[2i+1]) as complex numbers times exp(1j * pos * base^(-2i/Z))."""
    z = x.shape[-1]
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], z // 2, 2).contiguous())
    theta = base ** (-torch.arange(0, z, 2, dtype=F64) / z)
    angle = positions.to(F64).unsqueeze(-1) * theta
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angle), angle)).reshape(x.shape)


def dense_attention_reference(gau, q, k, v, positions, valid):
    """Dense [M, M] causal local attention: query i sees keys j with i - w <= j <= i that
    are valid (compressed-slot distance). Returns [M, B, H]; rows of invalid queries are 0."""
    length, batch = valid.shape
    w = gau.window
    dist = torch.arange(length).unsqueeze(1) - torch.arange(length).unsqueeze(0)  # i - j
    out = torch.zeros(length, batch, v.shape[-1])
    for b in range(batch):
        s = q[:, b] @ k[:, b].T
        s = s / math.sqrt(gau.zdim) if gau.attention_fn == "softmax" else s / w
        if gau.position == "simple":
            p = gau.rel_bias.numel()
            pos_dist = positions[:, b].unsqueeze(1) - positions[:, b].unsqueeze(0)
            s = s + gau.rel_bias.detach()[pos_dist.clamp(0, p - 1)]
        elif gau.position == "local":
            s = s + gau.rel_bias.detach()[dist.clamp(0, w)]
        allowed = (dist >= 0) & (dist <= w) & valid[:, b].unsqueeze(0)
        if gau.attention_fn == "softmax":
            a = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1)
            a = torch.nan_to_num(a, nan=0.0)
        else:
            a = F.relu(s).pow(2) * allowed
        out[:, b] = (a @ v[:, b]) * valid[:, b].unsqueeze(1)
    return out


def gau_reference(gau, m, positions, valid):
    """The whole GAU from its weights: shared silu projection, per-dim scale/offset,
    optional rotary, dense local attention, gating by r, output projection."""
    z = F.silu(F.linear(m, gau.z_proj.weight, gau.z_proj.bias))
    r = F.silu(F.linear(m, gau.r_proj.weight, gau.r_proj.bias))
    v = F.silu(F.linear(m, gau.v_proj.weight, gau.v_proj.bias))
    q = z * gau.qk_scale[0] + gau.qk_offset[0]
    k = z * gau.qk_scale[1] + gau.qk_offset[1]
    if gau.position == "rotary":
        q = rotary_reference(q, positions, gau.rope_base)
        k = rotary_reference(k, positions, gau.rope_base)
    a = dense_attention_reference(gau, q, k, v, positions, valid)
    return F.linear(a * r, gau.out_proj.weight, gau.out_proj.bias)


def make_gau(window, attention_fn, position, width=6, zdim=4, hdim=5, max_positions=7):
    gau = GatedAttentionUnit(
        width, zdim, hdim, window, attention_fn, position, max_positions=max_positions
    ).double()
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


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("length", [1, 2, 5, 17])
@pytest.mark.parametrize("position", ["none", "simple", "local"])
@pytest.mark.parametrize("attention_fn", ["softmax", "relu2"])
def test_local_attention_matches_dense(window, length, position, attention_fn):
    gau = make_gau(window, attention_fn, position)
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


@pytest.mark.parametrize("window", [1, 3, 8])
def test_local_attention_attended_set(window):
    """With q = 0 softmax is uniform over the attended set; v = one-hot slots reveals it:
    exactly the valid slots j with i - w <= j <= i (empty slots inside the window count)."""
    gau = make_gau(window, "softmax", "none")
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


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("position", ["rotary", "simple", "local", "none"])
@pytest.mark.parametrize("attention_fn", ["softmax", "relu2"])
def test_gau_forward_matches_reference(window, position, attention_fn):
    """The GAU as the layer calls it: left-packed valid prefixes, zeros / position 0 in the
    empty slots, original positions of the packed tokens."""
    gau = make_gau(window, attention_fn, position)
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


# ======================================================================= layer


def layer_reference(layer: SeqBoatLayer, x: torch.Tensor, routing: str):
    """The layer written out: per sequence, gather the activated tokens, run the GAU
    reference on them alone (positions = their original positions), scatter back, gate."""
    length, batch, _ = x.shape
    h = layer.norm(x) if layer.prenorm else x
    m = F.silu(layer.ema(h))
    proj = F.linear(m, layer.hx_proj.weight, layer.hx_proj.bias)
    if routing == "sparse":
        u, hx = proj[..., :2], proj[..., 2:]
        diff = u[..., 1] - u[..., 0] - layer.router.act_bias
        activated = diff > 0
        gate = torch.sigmoid(diff / layer.router.log_temp.exp()) * activated
    else:
        hx = proj
        activated = torch.full((length, batch), routing == "always")
        gate = torch.ones(length, batch)
    o = torch.zeros_like(hx)
    span_sum, pairs = 0, 0
    w = layer.gau.window if layer.gau is not None else 0
    for b in range(batch):
        idx = torch.nonzero(activated[:, b]).flatten()
        if len(idx) == 0:
            continue
        oc = gau_reference(
            layer.gau, m[idx, b].unsqueeze(1), idx.unsqueeze(1), torch.ones(len(idx), 1, dtype=bool)
        )
        o[idx, b] = oc[:, 0] * gate[idx, b].unsqueeze(-1)
        for i in range(len(idx)):
            for j in range(max(0, i - w), i + 1):
                span_sum += int(idx[i] - idx[j])
                pairs += 1
    y = F.silu(x + hx + o)
    if not layer.prenorm:
        y = layer.norm(y)
    return y, activated, span_sum, pairs


@pytest.mark.parametrize(
    "routing,position,prenorm",
    [
        ("sparse", "rotary", True),
        ("sparse", "simple", False),
        ("sparse", "local", True),
        ("always", "rotary", True),
        ("always", "simple", True),
        ("never", "rotary", True),
        ("never", "none", False),
    ],
)
def test_layer_matches_reference(routing, position, prenorm):
    layer = SeqBoatLayer(
        small_cfg(routing=routing, position=position, prenorm=prenorm, window=3, max_positions=9)
    ).double()
    with torch.no_grad():  # sharper routing and attention than the tiny init
        layer.hx_proj.weight.normal_(0.0, 0.3)
        if layer.gau is not None:
            for p in layer.gau.parameters():
                p.normal_(0.0, 0.4)
    x = torch.randn(23, 3, 16)
    with torch.no_grad():
        y, stats = layer(x, collect_stats=True)
        ref, activated, span_sum, pairs = layer_reference(layer, x, routing)
    assert torch.equal(stats.activated, activated)
    if routing == "sparse":
        assert activated.any() and (~activated).any()
        counts = activated.sum(0)
        assert len(set(counts.tolist())) > 1  # ragged batch
    assert rel_err(y, ref) < 1e-10
    assert int(stats.span_pairs) == pairs
    assert math.isclose(float(stats.span_sum), span_sum)


def test_layer_never_has_no_gau_contribution():
    layer = SeqBoatLayer(small_cfg(routing="never")).double()
    assert layer.gau is None and layer.router is None
    x = torch.randn(11, 2, 16)
    with torch.no_grad():
        y, stats = layer(x, collect_stats=True)
        m = F.silu(layer.ema(layer.norm(x)))
        expected = F.silu(x + layer.hx_proj(m))
    assert torch.allclose(y, expected, rtol=1e-13, atol=1e-15)
    assert not stats.activated.any()
    assert int(stats.span_pairs) == 0


def test_layer_always_activates_every_token_ungated():
    layer = SeqBoatLayer(small_cfg(routing="always")).double()
    assert layer.router is None and layer.hx_proj.out_features == 16
    x = torch.randn(10, 2, 16)
    with torch.no_grad():
        _, stats = layer(x, collect_stats=True)
    assert stats.activated.all()
    w = layer.gau.window
    assert int(stats.span_pairs) == 2 * sum(min(i, w) + 1 for i in range(10))


def test_layer_activation_stats_match_router_decisions():
    layer = SeqBoatLayer(small_cfg(routing="sparse")).double()
    seen = {}
    layer.router.register_forward_hook(lambda _m, _i, out: seen.update(activated=out[0]))
    x = torch.randn(64, 4, 16)
    with torch.no_grad():
        _, stats = layer(x, collect_stats=True)
        proj = F.linear(F.silu(layer.ema(layer.norm(x))), layer.hx_proj.weight, layer.hx_proj.bias)
    independent = proj[..., 1] > proj[..., 0]
    assert torch.equal(stats.activated, seen["activated"])
    assert torch.equal(stats.activated, independent)
    ratio = stats.activated.double().mean().item()
    assert 0.1 < ratio < 0.9  # the random init routes some tokens, not all


@pytest.mark.parametrize("bias,expect_all", [(1e4, False), (-1e4, True)])
def test_layer_act_bias_extremes(bias, expect_all):
    cfg = small_cfg(routing="sparse", act_bias=bias)
    layer = SeqBoatLayer(cfg).double()
    x = torch.randn(15, 3, 16)
    with torch.no_grad():
        y, stats = layer(x, collect_stats=True)
        ref, activated, _, _ = layer_reference(layer, x, "sparse")
    assert bool(stats.activated.all()) is expect_all
    assert bool(stats.activated.any()) is expect_all
    assert torch.equal(stats.activated, activated)
    assert rel_err(y, ref) < 1e-10
    if not expect_all:  # nothing activated: the GAU contributes nothing
        with torch.no_grad():
            proj = layer.hx_proj(F.silu(layer.ema(layer.norm(x))))
        assert torch.allclose(y, F.silu(x + proj[..., 2:]), rtol=1e-13, atol=1e-15)


# ================================================================ causality of the LM


CAUSAL_CASES = [
    *[
        dict(routing=r, position=p)
        for r in ("sparse", "always", "never")
        for p in ("rotary", "simple", "local")
    ],
    dict(routing="sparse", position="simple", attention_fn="relu2", prenorm=False),
    dict(routing="sparse", position="rotary", ema_truncation=5),
    dict(arch="transformer"),
]


def mix_routing(model, tokens) -> None:
    """Sets each layer's act_bias between the two middle values of its logit differences
    (layer by layer), so about half the tokens are activated, away from any tie; checks it."""
    for layer in model.layers:
        seen = {}
        hook = layer.router.register_forward_hook(
            lambda _m, inp, _o, seen=seen: seen.update(u=inp[0])
        )
        with torch.no_grad():
            model(tokens)
        hook.remove()
        diff = (seen["u"][..., 1] - seen["u"][..., 0]).flatten().sort().values
        half = diff.numel() // 2
        layer.router.act_bias = float(diff[half - 1] + diff[half]) / 2
    with torch.no_grad():
        _, stats = model(tokens, collect_stats=True)
    for s in stats:
        assert 0.3 < s.activated.double().mean().item() < 0.7
        assert s.activated.any(0).all() and (~s.activated).any(0).all()  # every sequence


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_lm_is_causal(case):
    cfg = small_cfg(**case)
    vocab = 50
    model = LanguageModel(cfg, vocab).double().eval()
    length, batch = 37, 3
    tokens = torch.randint(0, vocab, (batch, length))
    if cfg.arch == "seqboat" and cfg.routing == "sparse":
        mix_routing(model, tokens)
    with torch.no_grad():
        base, _ = model(tokens)
    assert base.shape == (length, batch, model.padded_vocab)
    scale = base.abs().max()
    gen = torch.Generator().manual_seed(7)
    for t in (0, 4, 15, 30, length - 2):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, vocab, (batch, length - t - 1), generator=gen)
        with torch.no_grad():
            logits, _ = model(changed)
        assert (logits[: t + 1] - base[: t + 1]).abs().max() <= 1e-12 * scale, t
        assert (logits[t + 1 :] - base[t + 1 :]).abs().max() > 1e-6  # the change is visible


@pytest.mark.parametrize("routing", ["sparse", "always"])
def test_lm_batch_elements_are_independent(routing):
    """Another sequence's routing changes M (the compressed length) but never the logits."""
    model = LanguageModel(small_cfg(routing=routing), 50).double().eval()
    tokens = torch.randint(0, 50, (3, 40))
    if routing == "sparse":
        mix_routing(model, tokens)
    with torch.no_grad():
        base, _ = model(tokens)
        other = tokens.clone()
        other[1:] = torch.randint(0, 50, (2, 40))
        logits, _ = model(other)
        alone, _ = model(tokens[:1])
    scale = base.abs().max()
    assert (logits[:, 0] - base[:, 0]).abs().max() <= 1e-12 * scale
    assert (alone[:, 0] - base[:, 0]).abs().max() <= 1e-12 * scale


# ================================================================ no [L, L] tensor


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor every aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("routing,position", [("always", "simple"), ("sparse", "rotary")])
def test_no_quadratic_tensor_on_training_path(routing, position):
    length, window = 4096, 16
    cfg = small_cfg(layers=1, routing=routing, position=position, window=window, ndim=4)
    model = LanguageModel(cfg, 60).float()
    tokens = torch.randint(0, 60, (1, length + 1))
    fwd, bwd = ShapeRecorder(), ShapeRecorder()
    with fwd:
        loss, _ = model.loss(tokens)
    with bwd:
        loss.backward()
    assert bwd.shapes, "the recorder must see the backward pass"
    # The recorder does see the windowed score tensor [B * blocks, w, 2w] ...
    assert any(s[-2:] == (window, 2 * window) and len(s) == 3 for s in fwd.shapes)
    assert any(s[-2:] == (window, 2 * window) and len(s) == 3 for s in bwd.shapes)
    # ... and nothing quadratic in L: no [L, L]-sized output, no two dims >= L / 4.
    for shape in fwd.shapes + bwd.shapes:
        assert math.prod(shape) < length * length // 4, shape
        assert sum(d >= length // 4 for d in shape) < 2, shape
