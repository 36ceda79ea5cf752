"""Incremental decoding with O(1) state per SeqBoat layer.

A layer keeps the EMA state [B, D, N] and a ring buffer of the keys, values, original
positions and activated-token indices of its last ``window`` activated tokens. One step
costs O(D*N + w*(Z+H)) whatever the length so far, and gives the full forward's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.layer import SeqBoatLayer
from pretrain.model.lm import LanguageModel


@dataclass
class LayerState:
    ema: Tensor  # [B, D, N]
    keys: Tensor  # [B, w, Z]
    values: Tensor  # [B, w, H]
    positions: Tensor  # [B, w] original positions of the buffered keys
    indices: Tensor  # [B, w] their indices among the activated tokens
    count: Tensor  # [B] activated tokens so far


@dataclass
class DecodeState:
    layers: list[LayerState]
    position: int = 0


def init_state(model: LanguageModel, batch: int) -> DecodeState:
    if model.cfg.arch != "seqboat":
        raise ValueError("incremental decoding is defined for the SeqBoat architecture only")
    p = next(model.parameters())
    cfg = model.cfg
    w = cfg.window

    def zeros(*shape: int, dtype: torch.dtype = p.dtype) -> Tensor:
        return torch.zeros(*shape, device=p.device, dtype=dtype)

    ema_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    layers = [
        LayerState(
            ema=zeros(batch, cfg.width, cfg.ndim, dtype=ema_dtype),
            keys=zeros(batch, w, cfg.zdim),
            values=zeros(batch, w, cfg.hdim),
            positions=zeros(batch, w, dtype=torch.long),
            indices=zeros(batch, w, dtype=torch.long),
            count=zeros(batch, dtype=torch.long),
        )
        for _ in model.layers
    ]
    return DecodeState(layers)


@torch.no_grad()
def step(model: LanguageModel, tokens: Tensor, state: DecodeState) -> Tensor:
    """tokens: [B] -> logits [B, padded vocab] for the next token; advances ``state``."""
    x = model.embedding(tokens) * model.embed_scale
    for layer, layer_state in zip(model.layers, state.layers, strict=True):
        x = _layer_step(layer, x, layer_state, state.position)
    state.position += 1
    return model.logits(model.final_norm(x))


def _layer_step(layer: SeqBoatLayer, x: Tensor, s: LayerState, t: int) -> Tensor:
    h = layer.norm(x) if layer.prenorm else x
    m, s.ema = layer.ema.step(h, s.ema)
    m = F.silu(m)
    hx, activated, gate = layer.route(layer.hx_proj(m))
    o = torch.zeros_like(hx)
    if layer.gau is not None:
        if activated is None:
            activated = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        o = _attend_step(layer, m, s, t, activated)
        if gate is not None:
            o = o * gate.unsqueeze(-1)
        o = o * activated.unsqueeze(-1).to(o.dtype)
    y = F.silu(x + hx + o)
    if not layer.prenorm:
        y = layer.norm(y)
    if layer.ffn is not None:
        y = layer._ffn_block(y)
    return y


def _attend_step(
    layer: SeqBoatLayer, m: Tensor, s: LayerState, t: int, activated: Tensor
) -> Tensor:
    gau = layer.gau
    w = gau.window
    batch = m.shape[0]
    position = torch.full((batch,), t, device=m.device, dtype=torch.long)
    q, k, v, r = gau.project(m, position)
    keys = torch.cat([s.keys, k.unsqueeze(1)], 1)  # [B, w+1, Z]: buffer, then the token itself
    values = torch.cat([s.values, v.unsqueeze(1)], 1)
    pos_k = torch.cat([s.positions, position.unsqueeze(1)], 1)
    idx_k = torch.cat([s.indices, s.count.unsqueeze(1)], 1)
    filled = torch.arange(w, device=m.device).unsqueeze(0) < s.count.clamp(max=w).unsqueeze(1)
    allowed = torch.cat([filled, torch.ones_like(filled[:, :1])], 1)
    scores = (keys @ q.unsqueeze(-1)).squeeze(-1) * gau.scale()
    weights = gau.attention_weights(
        scores, allowed, position.unsqueeze(1) - pos_k, s.count.unsqueeze(1) - idx_k
    )
    attn = (weights.to(values.dtype).unsqueeze(1) @ values).squeeze(1)
    # Push the activated tokens into the ring (slot = count mod w).
    rows = torch.nonzero(activated).squeeze(1)
    slots = s.count[rows] % w
    s.keys[rows, slots] = k[rows]
    s.values[rows, slots] = v[rows]
    s.positions[rows, slots] = t
    s.indices[rows, slots] = s.count[rows]
    s.count = s.count + activated.long()
    return gau.out_proj(attn * r)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """Samples a continuation of ``prompt`` (temperature 0 = greedy). SeqBoat decodes
    incrementally; the Transformer baseline recomputes the full forward each token."""
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[int] = []
    if model.cfg.arch == "seqboat":
        state = init_state(model, 1)
        for tok in prompt[:-1]:
            step(model, torch.tensor([tok], device=device), state)
        last = prompt[-1]
        for _ in range(max_new_tokens):
            logits = step(model, torch.tensor([last], device=device), state)[0]
            last = _sample(logits[: model.vocab_size], temperature, top_k, generator)
            out.append(last)
            if last == eos_id:
                break
    else:
        ids = list(prompt)
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([ids], device=device))
            ids.append(_sample(logits[-1, 0, : model.vocab_size], temperature, top_k, generator))
            out.append(ids[-1])
            if ids[-1] == eos_id:
                break
    model.train(was_training)
    return out


def _sample(
    logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
