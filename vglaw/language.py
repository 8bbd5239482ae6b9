"""Language backbone: the first layers of a BERT encoder (spec item 1)."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import BertConfig, BertModel


class LanguageBackbone(nn.Module):
    """BERT without its pooler; returns every token's feature F_l [B, L, d_l] (F_l[:, 0] is [CLS])."""

    def __init__(
        self,
        *,
        vocab_size: int,
        num_layers: int,
        hidden_size: int,
        num_attention_heads: int,
        intermediate_size: int,
        max_position_embeddings: int = 512,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=init_std,
        )
        self.out_channels = hidden_size
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``input_ids`` [B, L], ``attention_mask`` [B, L] (True/1 = real token) -> [B, L, d_l]."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state
