"""Hugging Face config of an exported SeqBoat model: the run's ``model`` section as it was
trained (``seqboat``) and the tokenizer's vocabulary size."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class SeqBoatConfig(PretrainedConfig):
    model_type = "seqboat"

    def __init__(
        self,
        seqboat: dict[str, Any] | None = None,
        vocab_size: int = 257,
        eos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.seqboat = dict(seqboat or {})
        self.vocab_size = vocab_size
        # The head is tied inside the model (its embedding weight); nothing for HF to tie.
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(eos_token_id=eos_token_id, **kwargs)
