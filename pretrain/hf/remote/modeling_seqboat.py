"""Hugging Face model of an exported SeqBoat (or Transformer baseline) language model.

``model`` is the project's own single-process ``LanguageModel`` (its modules are copied into
this folder), so the maths are the training code's. ``generate()`` keeps a cache: SeqBoat's
O(1) decoding state (per layer the EMA state and a ring of the last ``window`` activated
keys/values), or the baseline's key/value cache. The first forward of a prompt is one
parallel pass that also fills the cache; each later token is one decoding step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_seqboat import SeqBoatConfig
from .pretrain_config import ModelConfig
from .pretrain_hf_cache import cache_for
from .pretrain_model_lm import LanguageModel


class SeqBoatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SeqBoatConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: SeqBoatConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(ModelConfig(**config.seqboat), config.vocab_size)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The project's modules initialise themselves; exported weights replace them."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own cache, made by the first forward (not HF's DynamicCache)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embedding

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, L] -> logits [B, L, vocab]. With a cache, input_ids continue the
        text it has seen. No padding: the EMA runs over every token it is given."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "SeqBoat models take no padding (attention_mask with zeros): the EMA reads "
                "every token; generate one prompt at a time or batch prompts of equal length"
            )
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if use_cache:
            if cache is None:
                cache = cache_for(self.model, input_ids.shape[0])
            logits = cache.forward(self.model, input_ids)
        else:
            cache = None
            logits, _ = self.model(input_ids)
        logits = logits.transpose(0, 1)[..., : self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
