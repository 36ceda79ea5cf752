"""The causal language model: embedding, a stack of layers, final norm, tied head, loss.

Activations are sequence-major [L, B, D] as in megatron-core; the public entry points take
and return batch-major token tensors [B, L] like every data loader.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.layout import mark_replicated, mark_tensor_parallel
from pretrain.config import ModelConfig
from pretrain.model.layer import LayerStats, SeqBoatLayer
from pretrain.model.norm import make_norm
from pretrain.model.transformer import TransformerLayer


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, cfg.vocab_multiple)
        d = cfg.width
        self.embedding = nn.Embedding(self.padded_vocab, d)
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.embedding_dropout = nn.Dropout(cfg.embedding_dropout)
        layer_cls = SeqBoatLayer if cfg.arch == "seqboat" else TransformerLayer
        self.layers = nn.ModuleList(layer_cls(cfg) for _ in range(cfg.layers))
        # Pre-norm stacks end with a norm (SEQBOAT.md §9.1); post-norm layers end normalised.
        self.final_norm = (
            make_norm(cfg.norm, d, affine=cfg.final_norm_affine) if cfg.prenorm else nn.Identity()
        )
        self.head = None if cfg.tie_embeddings else nn.Linear(d, self.padded_vocab, bias=False)
        # Vocab-parallel under tensor parallelism: split along the vocabulary.
        mark_tensor_parallel(self.embedding.weight, dim=0)
        if self.head is not None:
            mark_tensor_parallel(self.head.weight, dim=0)
        for p in self.final_norm.parameters():
            mark_replicated(p)
        self.reset_embedding()

    @torch.no_grad()
    def reset_embedding(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.cfg.width**-0.5)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=self.cfg.width**-0.5)

    def forward(
        self, tokens: Tensor, collect_stats: bool = False
    ) -> tuple[Tensor, list[LayerStats] | None]:
        """tokens: [B, L] -> (logits [L, B, padded vocab], per-layer stats or None)."""
        x = self.embedding(tokens.t()) * self.embed_scale
        x = self.embedding_dropout(x)
        stats: list[LayerStats] = []
        for layer in self.layers:
            x, layer_stats = layer(x, collect_stats)
            if layer_stats is not None:
                stats.append(layer_stats)
        return self.logits(self.final_norm(x)), (stats if collect_stats else None)

    def logits(self, h: Tensor) -> Tensor:
        weight = self.embedding.weight if self.head is None else self.head.weight
        return F.linear(h, weight)

    def loss(self, tokens: Tensor, collect_stats: bool = False) -> tuple[Tensor, list | None]:
        """tokens: [B, L+1] (inputs and shifted targets) -> (mean loss over tokens, stats)."""
        logits, stats = self(tokens[:, :-1], collect_stats)
        return token_losses(logits, tokens[:, 1:]).mean(), stats


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [L, B, V], targets [B, L] -> per-token cross-entropy [L, B] in float32+."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    length, batch, vocab = logits.shape
    losses = F.cross_entropy(logits.reshape(-1, vocab), targets.t().reshape(-1), reduction="none")
    return losses.view(length, batch)
