"""Tests of the whole language model (pretrain/model/lm.py): causality, independence of the
sequences of a batch, and no [L, L]-sized tensor on the training path.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pretrain.model.gau import query_block
from pretrain.model.lm import LanguageModel
from tests.model.reference import small_cfg

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
    # The recorder does see the windowed score tensor [blocks, b, w + b] ...
    block = query_block(window, cfg.attention_block)
    scores = (block, window + block)
    assert any(s[-2:] == scores and len(s) == 3 for s in fwd.shapes)
    assert any(s[-2:] == scores and len(s) == 3 for s in bwd.shapes)
    # ... and nothing quadratic in L: no [L, L]-sized output, no two dims >= L / 4.
    for shape in fwd.shapes + bwd.shapes:
        assert math.prod(shape) < length * length // 4, shape
        assert sum(d >= length // 4 for d in shape) < 2, shape
