"""The causal language model: embedding, a stack of layers, final norm, tied head, loss.

Activations are sequence-major [L, B, D] as in megatron-core; the public entry points take
and return batch-major token tensors [B, L] like every data loader.

A pipeline stage (``stage``, parallel/pipeline.py) is the same model holding only its part:
the embedding on the first stage, the layers of its range keyed by their global index, the
final norm and head on the last stage (with a tied head, a copy of the embedding weight).
Its ``state_dict`` keys are the full model's for the parameters it holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from parallel.context import ContextParallel
from parallel.layout import mark_replicated, mark_sequence_parallel, mark_tensor_parallel
from parallel.materialize import draw_seed, materialize_
from parallel.pipeline import Stage
from parallel.tensor import (
    SplitDropout,
    TensorParallel,
    column_linear,
    cross_entropy,
    embed,
    lm_logits,
    vocab_embedding,
)
from pretrain.config import ModelConfig
from pretrain.model.init import initialize_, normal
from pretrain.model.layer import LayerStats, SeqBoatLayer
from pretrain.model.norm import make_norm
from pretrain.model.transformer import TransformerLayer


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class LanguageModel(nn.Module):
    """With ``tp`` (tensor parallel, size > 1) the embedding and head are vocab-parallel and
    ``forward`` returns this rank's vocabulary slice of the logits. With ``cp`` (context
    parallel) the tokens given are this rank's chunk of each sequence. With ``stage`` (a
    pipeline stage) a stage other than the first takes its input from ``set_input_tensor``,
    and a stage other than the last returns its hidden state instead of logits.

    The weights are those of the single-process model of ``seed`` (default: one draw from
    the default CPU generator), on any split: the modules are built on the meta device, then
    each parameter is initialised from its own stream and only this chunk's shard kept
    (parallel/materialize.py), so a rank never holds more than its shards and one full
    parameter. Built under ``torch.device("meta")``, the model stays there, uninitialised."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        tp: TensorParallel = TensorParallel(),
        cp: ContextParallel = ContextParallel(),
        stage: Stage | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        on_meta = torch.get_default_device().type == "meta"
        if seed is None and not on_meta:
            seed = draw_seed()
        with torch.device("meta"):
            self._build(cfg, vocab_size, tp, cp, stage)
        if not on_meta:
            materialize_(self, seed, tp)

    def _build(
        self, cfg: ModelConfig, vocab_size: int, tp: TensorParallel, cp: ContextParallel,
        stage: Stage | None,
    ) -> None:  # fmt: skip
        if (tp.active or cp.active) and cfg.arch != "seqboat":
            raise ValueError("model parallelism is implemented for the SeqBoat architecture")
        self.cfg = cfg
        self.tp = tp
        self.stage = stage or Stage.whole(cfg.layers)
        if self.stage.layers.stop > cfg.layers or self.stage.layers.start < 0:
            raise ValueError(f"stage layers {self.stage.layers} outside 0..{cfg.layers - 1}")
        first, last = self.stage.first, self.stage.last
        self.input_tensor: Tensor | None = None  # a later stage's input (set_input_tensor)
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab_size(vocab_size, cfg.vocab_multiple)
        d = cfg.width
        # The last stage of a tied model holds a copy of the embedding weight for the head.
        holds_embedding = first or (last and cfg.tie_embeddings)
        self.embedding = vocab_embedding(self.padded_vocab, d, tp) if holds_embedding else None
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.embedding_dropout = SplitDropout(cfg.embedding_dropout, split=tp.sequence_parallel)
        layers = [self._make_layer(cp) for _ in self.stage.layers]
        # A stage keys its layers by global index: the same state_dict keys as the full model.
        self.layers = (
            nn.ModuleList(layers)
            if first and last
            else nn.ModuleDict(
                {str(i): layer for i, layer in zip(self.stage.layers, layers, strict=True)}
            )
        )
        # Pre-norm stacks end with a norm (as the reference LM); post-norm layers end normalised.
        self.final_norm = self._make_final_norm() if last else None
        self.head = (
            None
            if cfg.tie_embeddings or not last
            else column_linear(d, self.padded_vocab, tp, bias=False)
        )
        # Vocab-parallel under tensor parallelism: split along the vocabulary.
        if self.embedding is not None:
            mark_tensor_parallel(self.embedding.weight, dim=0)
            initialize_(self.embedding.weight, normal(d**-0.5))
        if self.head is not None:
            mark_tensor_parallel(self.head.weight, dim=0)
            initialize_(self.head.weight, normal(d**-0.5))
        if self.final_norm is not None:
            for p in self.final_norm.parameters():
                mark_replicated(p)
            if tp.sequence_parallel:
                mark_sequence_parallel(self.final_norm)

    def _make_final_norm(self) -> nn.Module:
        cfg = self.cfg
        if cfg.prenorm:
            return make_norm(cfg.norm, cfg.width, affine=cfg.final_norm_affine)
        return nn.Identity()

    def _make_layer(self, cp: ContextParallel) -> nn.Module:
        if self.cfg.arch == "seqboat":
            return SeqBoatLayer(self.cfg, self.tp, cp)
        return TransformerLayer(self.cfg)

    def stack(self) -> list[nn.Module]:
        """This model's layers in order (a stage's ModuleDict iterates over keys)."""
        if isinstance(self.layers, nn.ModuleDict):
            return list(self.layers.values())
        return list(self.layers)

    def set_input_tensor(self, tensor: Tensor | list[Tensor | None] | None) -> None:
        """The previous stage's output for the next forward (megatron-core's schedules pass
        a one-element list; the first stage gets None and embeds its tokens)."""
        if isinstance(tensor, list):
            tensor = tensor[0]
        self.input_tensor = tensor

    def forward(
        self, tokens: Tensor, collect_stats: bool = False
    ) -> tuple[Tensor, list[LayerStats] | None]:
        """tokens: [B, L] -> (logits [L, B, padded vocab (/tp)], per-layer stats or None).

        A pipeline stage other than the first ignores ``tokens`` and starts from the tensor
        given to ``set_input_tensor``; one other than the last returns its hidden state
        [L(/tp), B, D] instead of logits."""
        if self.stage.first:
            x = embed(self.embedding, tokens, self.tp) * self.embed_scale
            x = self.embedding_dropout(x)
        elif self.input_tensor is None:
            raise RuntimeError("a later pipeline stage needs set_input_tensor before forward")
        else:
            x = self.input_tensor
        stats: list[LayerStats] = []
        for layer in self.stack():
            x, layer_stats = layer(x, collect_stats)
            if layer_stats is not None:
                stats.append(layer_stats)
        stats_out = stats if collect_stats else None
        if not self.stage.last:
            return x, stats_out
        return self.logits(self.final_norm(x)), stats_out

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

    def pipeline_forward(
        self, tokens: Tensor, collect_stats: bool = False
    ) -> tuple[Tensor, list[LayerStats] | None]:
        """A pipeline stage's output for megatron-core's schedules: the mean loss of the
        micro-batch ``tokens`` [B, L+1] on the last stage, the hidden state elsewhere; and
        this stage's layers' statistics when ``collect_stats``."""
        if self.stage.last:
            return self.loss(tokens, collect_stats)
        return self(tokens[:, :-1], collect_stats)

    def tied_weights(self) -> list[nn.Parameter]:
        """The embedding weight where a tied head makes it shared between the first and the
        last stage (for parallel/pipeline.py ``sync_tied_grads``); else empty."""
        whole = self.stage.first and self.stage.last
        if not self.cfg.tie_embeddings or self.embedding is None or whole:
            return []
        return [self.embedding.weight]


class StageChunks(nn.Module):
    """One pipeline rank's model chunks (virtual stages) seen as one module named like the
    full model: the chunks' embedding, layers (by global index), final norm and head are
    registered here too (shared, not copied), so optimizers and checkpoints see the global
    names. Not callable: the schedules run the chunks (``chunks``)."""

    def __init__(self, chunks: list[LanguageModel]) -> None:
        super().__init__()
        self.chunks = tuple(chunks)  # a tuple: not registered twice under other names
        self.cfg = chunks[0].cfg
        self.padded_vocab = chunks[0].padded_vocab

        def held(name: str) -> nn.Module | None:
            return next((getattr(c, name) for c in chunks if getattr(c, name) is not None), None)

        self.embedding = held("embedding")
        self.layers = nn.ModuleDict(
            {key: layer for c in chunks for key, layer in _keyed_layers(c).items()}
        )
        self.final_norm = held("final_norm")
        self.head = held("head")

    def forward(self, *args: object) -> None:
        raise TypeError("StageChunks is a view for optimizers and checkpoints; run its chunks")


def _keyed_layers(model: LanguageModel) -> dict[str, nn.Module]:
    return {str(i): layer for i, layer in zip(model.stage.layers, model.stack(), strict=True)}


def stage_forward(
    dtype: torch.dtype, stats: dict[int, list[list[LayerStats]]] | None = None
) -> Callable[[nn.Module, Tensor], Tensor]:
    """The ``step_fn`` of ``pipeline_step``: a chunk's loss on the last stage, else its
    activation in ``dtype`` (the master dtype: under bf16 autocast a stage's output dtype
    depends on its last op, and the next stage's receive buffer must know it beforehand).
    With ``stats``, each chunk's layer statistics of every micro-batch are appended there,
    keyed by the chunk's first global layer."""

    def run(chunk: nn.Module, micro_batch: Tensor) -> Tensor:
        out, chunk_stats = chunk.pipeline_forward(micro_batch, stats is not None)
        if stats is not None:
            stats.setdefault(chunk.stage.layers.start, []).append(chunk_stats or [])
        return out if chunk.stage.last else out.to(dtype)

    return run
