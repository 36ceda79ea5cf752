"""Tests of the SeqBoat layer (pretrain/model/layer.py): EMA, routing, compressed GAU and
gating together, and how the router's logits get their gradient inside the layer.

The reference layer is written out from the SeqBoat paper (arXiv:2306.11197), with the
float64 GAU reference of tests/model_reference.py, not by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.layer import SeqBoatLayer
from tests.model.reference import gau_reference, rel_err, small_cfg


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
