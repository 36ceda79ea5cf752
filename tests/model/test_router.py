"""Tests of pretrain/model/router.py: compress / extract of the activated tokens, and the
router's decisions, gate and gradients.

The references are written from the SeqBoat paper (arXiv:2306.11197), not by calling the
code under test: explicit gathers for compress / extract, the sigmoid gate by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.model.router import Router, compress, extract, plan_compression

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
