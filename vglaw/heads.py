"""The multi-task head: a REC box branch and a RES mask branch, both conditioned on [CLS] (spec items 5, 6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn


class LanguageAdaptivePooling(nn.Module):
    """Pools a visual feature map with one attention query made from the expression's [CLS] feature."""

    def __init__(self, *, visual_dim: int, text_dim: int, key_dim: int) -> None:
        super().__init__()
        self.key_dim = key_dim
        self.query = nn.Linear(text_dim, key_dim)
        self.key = nn.Linear(visual_dim, key_dim)
        self.value = nn.Linear(visual_dim, visual_dim)

    def forward(self, visual: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        """``visual`` [B, C, h, w], ``cls`` [B, d_l] -> pooled [B, C] and attention A [B, h, w]."""
        b, _, h, w = visual.shape
        tokens = visual.flatten(2).transpose(1, 2)  # [B, hw, C]
        query = self.query(cls).unsqueeze(1)  # [B, 1, k]
        logits = (query @ self.key(tokens).transpose(1, 2)).squeeze(1).float() / math.sqrt(self.key_dim)  # [B, hw]
        # NOTE: the softmax over the h*w cells runs in fp32 (bf16 would round each of ~800 small weights to 2**-9
        # of itself), and the returned attention, which the attention loss takes the log of, stays fp32.
        attn = logits.softmax(dim=-1)  # [B, hw]
        values = self.value(tokens)  # [B, hw, C]
        pooled = torch.bmm(attn.unsqueeze(1).to(values.dtype), values).squeeze(1)  # [B, C]
        return pooled, attn.reshape(b, h, w)


class BoxHead(nn.Module):
    """REC branch: LAP, a 3-layer MLP and a sigmoid -> (cx, cy, w, h) normalised to the padded canvas.

    With ``categories`` > 0 it also classifies the pooled feature into that many object categories (a training
    aid, not in the paper; see :attr:`vglaw.config.HeadConfig.categories`).
    """

    def __init__(self, *, visual_dim: int, text_dim: int, key_dim: int, hidden_dim: int, categories: int = 0) -> None:
        super().__init__()
        self.pool = LanguageAdaptivePooling(visual_dim=visual_dim, text_dim=text_dim, key_dim=key_dim)
        self.mlp = nn.Sequential(
            nn.Linear(visual_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 4),
        )
        self.category = nn.Linear(visual_dim, categories) if categories else None

    def forward(self, visual: Tensor, cls: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``visual`` [B, C, h, w], ``cls`` [B, d_l] -> boxes [B, 4], LAP's attention [B, h, w] and the
        category logits [B, categories] (None without a classifier)."""
        pooled, attn = self.pool(visual, cls)
        logits = self.category(pooled).float() if self.category is not None else None
        # NOTE: the sigmoid runs in fp32: bf16 boxes near 0.5 would only resolve steps of 2**-9 of the canvas.
        return self.mlp(pooled).float().sigmoid(), attn, logits


class MaskHead(nn.Module):
    """RES branch: two stride-2 transposed convolutions to stride 4, a per-pixel dot product with [CLS], x4."""

    def __init__(self, *, visual_dim: int, text_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(visual_dim, hidden_dim, kernel_size=2, stride=2),
            LayerNorm2d(hidden_dim),
            nn.GELU(),
            nn.ConvTranspose2d(hidden_dim, text_dim, kernel_size=2, stride=2),
        )

    def forward(self, visual: Tensor, cls: Tensor, out_size: tuple[int, int]) -> Tensor:
        """``visual`` [B, C, h, w], ``cls`` [B, d_l] -> mask logits [B, *out_size]."""
        features = self.upsample(visual)  # [B, d_l, 4h, 4w]; bf16 under autocast
        # NOTE: the dot product stays in the features' dtype (a GEMM: bf16 inputs, fp32 accumulation), but the small
        # logit map is upsampled in fp32, so the mask logits leave the model fp32 and thresholding them at the
        # input resolution does not see bf16's 8-bit rounding steps.
        logits = torch.einsum("bchw,bc->bhw", features, cls.to(features.dtype)).float()  # s-bar, [B, 4h, 4w]
        return F.interpolate(logits.unsqueeze(1), size=out_size, mode="bilinear", align_corners=False).squeeze(1)
