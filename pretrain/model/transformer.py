"""The baseline: a plain pre-norm causal Transformer layer (RoPE, PyTorch SDPA, GELU FFN).

It shares the embedding, final norm and head of the SeqBoat LM, so the two differ only in
their layers. Its attention is dense and causal: cost quadratic in the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.model.init import init_linear_
from pretrain.model.norm import make_norm
from pretrain.model.rope import apply_rotary


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.width
        self.heads = cfg.transformer_heads
        self.rope_base = cfg.rope_base
        self.attention_dropout = cfg.attention_dropout
        self.attn_norm = make_norm(cfg.norm, d)
        self.qkv = init_linear_(nn.Linear(d, 3 * d))
        self.proj = init_linear_(nn.Linear(d, d))
        self.ffn_norm = make_norm(cfg.norm, d)
        self.fc1 = init_linear_(nn.Linear(d, cfg.transformer_ffn))
        self.fc2 = init_linear_(nn.Linear(cfg.transformer_ffn, d))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, collect_stats: bool = False) -> tuple[Tensor, None]:
        """x: [L, B, D] -> ([L, B, D], None)."""
        length, batch, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(length, batch, 3, self.heads, -1).unbind(2)
        positions = torch.arange(length, device=x.device).view(length, 1, 1)
        q, k = (
            apply_rotary(q, positions, self.rope_base),
            apply_rotary(k, positions, self.rope_base),
        )
        # [L, B, h, d] -> [B, h, L, d] for SDPA.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attention_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.proj(a.permute(2, 0, 1, 3).reshape(length, batch, width)))
        x = x + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.ffn_norm(x))))))
        return x, None
