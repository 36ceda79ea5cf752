"""Generation caches of an exported model (bundled into the folder, see bundle.py).

``DecodeCache`` holds SeqBoat's O(1) decoding state (``pretrain/model/decode.py``: the EMA
state of every layer and the ring buffer of the last ``window`` activated keys/values); its
cost per new token does not grow with the text so far. ``KVCache`` is the Transformer
baseline's growing key/value cache, for comparisons.

A SeqBoat prompt is prefilled by one parallel forward of the model, from which the state
is read off: each layer's final EMA state (``DampedEMA.scan_chunk``, the same recurrence)
and the keys/values of its last ``window`` activated tokens (``GatedAttentionUnit.project``
on those tokens), pushed into the ring exactly as ``decode.step`` would have. Later tokens go
through ``decode.step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.decode import DecodeState, LayerState, init_state, step
from pretrain.model.lm import LanguageModel
from pretrain.model.rope import apply_rotary


class DecodeCache:
    """SeqBoat's decoding state for a batch (no padding: every row at the same position)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: DecodeState) -> None:
        self.state = state

    @classmethod
    def empty(cls, model: LanguageModel, batch: int) -> DecodeCache:
        return cls(init_state(model, batch))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.position

    @torch.no_grad()
    def forward(self, model: LanguageModel, tokens: Tensor) -> Tensor:
        """tokens [B, L] after what the cache has seen -> logits [L, B, padded vocab]."""
        if self.state.position == 0 and tokens.shape[1] > 1:
            logits, self.state = prefill(model, tokens)
            return logits
        return torch.stack([step(model, tokens[:, i], self.state) for i in range(tokens.shape[1])])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep rows ``beam_idx`` of every tensor of the state."""
        for layer in self.state.layers:
            for name in ("ema", "keys", "values", "positions", "indices", "count"):
                setattr(layer, name, getattr(layer, name).index_select(0, beam_idx))


@torch.no_grad()
def prefill(model: LanguageModel, tokens: Tensor) -> tuple[Tensor, DecodeState]:
    """One full forward over ``tokens`` [B, L] -> (logits [L, B, padded vocab], the state
    ``decode.step`` would have reached after them)."""
    batch, length = tokens.shape
    state = init_state(model, batch)
    with _capture(model, state):
        logits, _ = model(tokens)
    state.position = length
    return logits, state


@contextlib.contextmanager
def _capture(model: LanguageModel, state: DecodeState) -> Iterator[None]:
    """Forward hooks that read each layer's decoding state off a full forward."""
    handles = []
    for layer, layer_state in zip(model.layers, state.layers, strict=True):
        handles.append(layer.ema.register_forward_hook(_ema_hook(layer_state)))
        if layer.gau is not None:
            handles.append(layer.gau.register_forward_hook(_ring_hook(layer.gau, layer_state)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ema_hook(s: LayerState):
    def hook(ema: torch.nn.Module, args: tuple, output: Tensor) -> None:
        s.ema = ema.scan_chunk(args[0])[1].to(s.ema.dtype)  # [B, C, N] after the sequence

    return hook


def _ring_hook(gau: torch.nn.Module, s: LayerState):
    """The GAU sees the compressed tokens (m [M, B, D], original positions [M, B], valid
    [M, B]); the ring gets the keys/values of each sequence's last ``window`` of them, in
    the slots ``decode`` uses (activated index mod window)."""

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        m, positions, valid = args[:3]
        w = gau.window
        counts = valid.sum(0)  # [B]
        kept = counts.clamp(max=w)
        offsets = torch.arange(w, device=m.device).unsqueeze(1)  # [w, 1]
        index = (counts - kept).unsqueeze(0) + offsets  # [w, B] activated indices
        filled = offsets < kept.unsqueeze(0)
        rows = index.clamp(max=m.shape[0] - 1)
        batch = torch.arange(m.shape[1], device=m.device).expand_as(rows)
        pos = positions[rows, batch]
        _, k, v, _ = gau.project(m[rows, batch], pos)
        slot, b = (index % w)[filled], batch[filled]
        s.keys[b, slot] = k[filled].to(s.keys.dtype)
        s.values[b, slot] = v[filled].to(s.values.dtype)
        s.positions[b, slot] = pos[filled]
        s.indices[b, slot] = index[filled]
        s.count = counts.to(s.count.dtype)

    return hook


class KVCache:
    """The Transformer baseline's keys and values of every layer ([B, heads, T, head dim])."""

    is_compileable = False
    is_croppable = False

    def __init__(self, layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * layers
        self.values: list[Tensor | None] = [None] * layers
        self.position = 0

    @classmethod
    def empty(cls, model: LanguageModel, batch: int) -> KVCache:
        return cls(len(model.layers))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.keys = [k.index_select(0, beam_idx) for k in self.keys]
        self.values = [v.index_select(0, beam_idx) for v in self.values]

    @torch.no_grad()
    def forward(self, model: LanguageModel, tokens: Tensor) -> Tensor:
        """tokens [B, L] -> logits [L, B, padded vocab]; the baseline's layer
        (``pretrain/model/transformer.py``) with the cached keys/values before the new ones."""
        x = model.embedding(tokens.t()) * model.embed_scale
        for i, layer in enumerate(model.layers):
            x = self._layer(i, layer, x)
        self.position += tokens.shape[1]
        return model.logits(model.final_norm(x))

    def _layer(self, i: int, layer: torch.nn.Module, x: Tensor) -> Tensor:
        length, batch, width = x.shape
        q, k, v = layer.qkv(layer.attn_norm(x)).view(length, batch, 3, layer.heads, -1).unbind(2)
        positions = torch.arange(self.position, self.position + length, device=x.device)
        positions = positions.view(length, 1, 1)
        q = apply_rotary(q, positions, layer.rope_base)
        k = apply_rotary(k, positions, layer.rope_base)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, h, L, d]
        if self.keys[i] is not None:
            k = torch.cat([self.keys[i], k], 2)
            v = torch.cat([self.values[i], v], 2)
        self.keys[i], self.values[i] = k, v
        # New query j sits at position past + j and sees every key up to it.
        allowed = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(
            k.shape[2] - length
        )
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + layer.dropout(layer.proj(a.permute(2, 0, 1, 3).reshape(length, batch, width)))
        return x + layer.dropout(layer.fc2(layer.dropout(F.gelu(layer.fc1(layer.ffn_norm(x))))))


def cache_for(model: LanguageModel, batch: int) -> DecodeCache | KVCache:
    """The empty generation cache of ``model``'s architecture."""
    if model.cfg.arch == "seqboat":
        return DecodeCache.empty(model, batch)
    return KVCache.empty(model, batch)
