"""Training FLOPs per token, for model FLOPs utilisation (MFU).

Counts the matrix multiplies (2 FLOPs per multiply-add) of one token's forward pass; the
backward costs twice the forward, so a training step is 3x. Two numbers for SeqBoat: the
*dense-equivalent* count (as if every token ran the GAU) and the *activated* count (the GAU
only on the tokens the router picked, at the measured activation ratio of each layer). The
EMA's FFT (O(D log L) per token) and elementwise work are left out, as MFU conventions do.
"""

from __future__ import annotations

from collections.abc import Sequence

from pretrain.config import ModelConfig


def layer_flops(cfg: ModelConfig, activation_ratio: float) -> float:
    """Forward FLOPs per token of one layer, with the GAU on ``activation_ratio`` of them."""
    d, z, h, w = cfg.width, cfg.zdim, cfg.hdim, cfg.window
    if cfg.arch == "transformer":
        # qkv + output projection, FFN, and causal attention over the whole sequence is not
        # per-token constant: counted by the caller's sequence length below.
        return 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * cfg.transformer_ffn
    routed = 2 if cfg.routing == "sparse" else 0
    flops = 2 * d * (d + routed)  # hx / router projection, every token
    if cfg.routing != "never":
        per_activated = 2 * d * (z + 2 * h) + 2 * h * d  # z, r, v and output projections
        per_activated += 2 * (w + 1) * (z + h)  # scores and weighted values over w + 1 keys
        flops += activation_ratio * per_activated
    if cfg.ffn_hidden:
        flops += 2 * 2 * d * cfg.ffn_hidden
    return flops


def training_flops_per_token(
    cfg: ModelConfig, vocab_size: int, seq_length: int, ratios: Sequence[float] | None = None
) -> float:
    """Forward + backward FLOPs per token; ``ratios``: per-layer activation ratios (None:
    every token activated, the dense-equivalent count)."""
    ratios = list(ratios) if ratios is not None else [1.0] * cfg.layers
    forward = sum(layer_flops(cfg, r) for r in ratios)
    if cfg.arch == "transformer":  # causal attention: on average L/2 keys per query
        forward += cfg.layers * 2 * 2 * (seq_length / 2) * cfg.width
    forward += 2 * cfg.width * vocab_size  # the output head (the embedding is a lookup)
    return 3 * forward
