"""The causal language model: embedding, a stack of layers, final norm, tied head, loss.

Activations are sequence-major [L, B, D] as in megatron-core; the public entry points take
and return batch-major token tensors [B, L] like every data loader.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from parallel.context import ContextParallel
from parallel.layout import mark_replicated, mark_sequence_parallel, mark_tensor_parallel
from parallel.tensor import (
    SINGLE,
    SplitDropout,
    TensorParallel,
    column_linear,
    cross_entropy,
    embed,
    lm_logits,
    vocab_embedding,
)
from pretrain.config import ModelConfig
from pretrain.model.layer import LayerStats, SeqBoatLayer
from pretrain.model.norm import make_norm
from pretrain.model.transformer import TransformerLayer


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class LanguageModel(nn.Module):
    """With ``tp`` (tensor parallel, size > 1) the embedding and head are vocab-parallel and
    ``forward`` returns this rank's vocabulary slice of the logits. With ``cp`` (context
    parallel) the tokens given are this rank's chunk of each sequence."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        tp: TensorParallel | None = None,
        cp: ContextParallel | None = None,
    ) -> None:
        super().__init__()
        tp = tp or SINGLE
        if (tp.active or (cp is not None and cp.active)) and cfg.arch != "seqboat":
            raise ValueError("model parallelism is implemented for the SeqBoat architecture")
        self.cfg = cfg
        self.tp = tp
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, cfg.vocab_multiple)
        d = cfg.width
        self.embedding = vocab_embedding(self.padded_vocab, d, tp)
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.embedding_dropout = SplitDropout(
            cfg.embedding_dropout, tp if tp.sequence_parallel else None
        )
        if cfg.arch == "seqboat":
            self.layers = nn.ModuleList(SeqBoatLayer(cfg, tp, cp) for _ in range(cfg.layers))
        else:
            self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))
        # Pre-norm stacks end with a norm (SEQBOAT.md §9.1); post-norm layers end normalised.
        self.final_norm = (
            make_norm(cfg.norm, d, affine=cfg.final_norm_affine) if cfg.prenorm else nn.Identity()
        )
        self.head = (
            None if cfg.tie_embeddings else column_linear(d, self.padded_vocab, tp, bias=False)
        )
        # Vocab-parallel under tensor parallelism: split along the vocabulary.
        mark_tensor_parallel(self.embedding.weight, dim=0)
        if self.head is not None:
            mark_tensor_parallel(self.head.weight, dim=0)
        for p in self.final_norm.parameters():
            mark_replicated(p)
        if tp.sequence_parallel:
            mark_sequence_parallel(self.final_norm)
        self.reset_embedding()

    @torch.no_grad()
    def reset_embedding(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.cfg.width**-0.5)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=self.cfg.width**-0.5)

    def forward(
        self, tokens: Tensor, collect_stats: bool = False
    ) -> tuple[Tensor, list[LayerStats] | None]:
        """tokens: [B, L] -> (logits [L, B, padded vocab (/tp)], per-layer stats or None)."""
        x = embed(self.embedding, tokens, self.tp) * self.embed_scale
        x = self.embedding_dropout(x)
        stats: list[LayerStats] = []
        for layer in self.layers:
            x, layer_stats = layer(x, collect_stats)
            if layer_stats is not None:
                stats.append(layer_stats)
        return self.logits(self.final_norm(x)), (stats if collect_stats else None)

    def logits(self, h: Tensor) -> Tensor:
        weight = self.embedding.weight if self.head is None else self.head.weight
        return lm_logits(h, weight, self.tp)

    def token_losses(
        self, tokens: Tensor, collect_stats: bool = False
    ) -> tuple[Tensor, list[LayerStats] | None]:
        """tokens: [B, L+1] (inputs, then shifted targets) -> (per-token loss [L, B], stats)."""
        logits, stats = self(tokens[:, :-1], collect_stats)
        return cross_entropy(logits, tokens[:, 1:].t().contiguous(), self.tp), stats

    def loss(
        self, tokens: Tensor, collect_stats: bool = False
    ) -> tuple[Tensor, list[LayerStats] | None]:
        """tokens: [B, L+1] -> (mean loss over all tokens, stats)."""
        losses, stats = self.token_losses(tokens, collect_stats)
        return losses.mean(), stats
