"""Language adaptive weights: per-block language aggregation and low-rank qkv generation.

For ViT block ``i`` the fused qkv projection becomes ``W_i = W0_i + P Phi_i(h1_i) Q^T`` (spec item 3). The
update is never materialised per sample: ``x W_i^T = x W0_i^T + ((x Q) Phi_i^T) P^T``, folded here into
``x @ down_i @ up^T`` with ``down_i = Q Phi_i^T`` ([B, C, d_w]) and ``up = P`` ([3C, d_w]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LowRankUpdate:
    """A per-sample low-rank change of a linear layer's weight: ``delta_W_b = up @ down_b^T``."""

    down: Tensor  # [B, C_in, r]
    up: Tensor  # [C_out, r]
    dense: bool = False  # materialise the [B, C_out, C_in] update instead (the slow reference path)

    def __call__(self, x: Tensor) -> Tensor:
        """``x`` [B, ..., C_in] -> the update's contribution [B, ..., C_out]."""
        batch, shape = x.shape[0], x.shape[1:-1]
        flat = x.reshape(batch, -1, x.shape[-1])  # [B, N, C_in]
        if self.dense:
            out = torch.bmm(flat, self.materialise().to(x.dtype).transpose(1, 2))
        else:
            out = torch.bmm(flat, self.down.to(x.dtype)) @ self.up.to(x.dtype).t()  # [B, N, C_out]
        return out.reshape(batch, *shape, -1)

    def materialise(self) -> Tensor:
        """The dense per-sample update [B, C_out, C_in]; for tests and benchmarks only."""
        return torch.einsum("or,bir->boi", self.up.to(self.down.dtype), self.down)


class LanguageFeatureAggregation(nn.Module):
    """One learnable query per ViT block attends over the expression's tokens in groups (spec item 2).

    There are no q/k/v projections: the block query is dotted with the raw token features per channel group,
    and the softmax runs over the non-padded tokens only.
    """

    def __init__(self, *, num_blocks: int, text_dim: int, groups: int, reduction: int) -> None:
        super().__init__()
        if text_dim % groups or text_dim % reduction:
            raise ValueError(f"text_dim {text_dim} must be divisible by groups {groups} and reduction {reduction}")
        self.num_blocks = num_blocks
        self.groups = groups
        self.block_queries = nn.Parameter(torch.empty(num_blocks, text_dim))  # e_i
        nn.init.trunc_normal_(self.block_queries, std=0.02)
        hidden_dim = text_dim // reduction  # d_h
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU())
            for _ in range(num_blocks)
        )

    @property
    def out_dim(self) -> int:
        return self.reduce[0][0].out_features

    def forward(self, text: Tensor, text_mask: Tensor) -> Tensor:
        """Aggregate ``text`` [B, L, d_l] with ``text_mask`` [B, L] (True = real token) -> h1 [B, blocks, d_h]."""
        batch, length, dim = text.shape
        group_dim = dim // self.groups
        tokens = text.reshape(batch, length, self.groups, group_dim)  # [B, L, G, c]
        queries = self.block_queries.reshape(self.num_blocks, self.groups, group_dim).to(text.dtype)
        logits = torch.einsum("blgc,ngc->bngl", tokens, queries).float() / math.sqrt(group_dim)  # [B, n, G, L]
        # NOTE: the masked softmax runs in fp32 whatever dtype autocast gave the einsum: in bf16 every weight would
        # be rounded to 8 significant bits, and these weights feed every block's generated qkv update.
        logits = logits.masked_fill(~text_mask.bool()[:, None, None, :], float("-inf"))
        alpha = logits.softmax(dim=-1).to(tokens.dtype)
        h0 = torch.einsum("bngl,blgc->bngc", alpha, tokens).reshape(batch, self.num_blocks, dim)  # [B, n, d_l]
        return torch.stack([reduce(h0[:, i]) for i, reduce in enumerate(self.reduce)], dim=1)  # [B, n, d_h]


class LanguageAdaptiveWeights(nn.Module):
    """Generates every block's low-rank qkv update from the aggregated language features (spec item 3)."""

    def __init__(self, *, num_blocks: int, embed_dim: int, hidden_dim: int, rank: int, out_mult: int = 3) -> None:
        super().__init__()
        self.rank = rank
        self.dense = False  # True computes through materialised per-sample weights (for comparisons only)
        # P and Q are shared by all blocks; Phi_i is per block.
        self.P = nn.Parameter(torch.randn(out_mult * embed_dim, rank) / math.sqrt(rank))  # [3C, d_w]
        self.Q = nn.Parameter(torch.randn(embed_dim, rank) / math.sqrt(embed_dim))  # [C, d_w]
        self.phi = nn.ModuleList(nn.Linear(hidden_dim, rank * rank) for _ in range(num_blocks))
        for layer in self.phi:
            # NOTE: Phi starts at zero so that step 0 equals the pretrained (static) backbone.
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def phi_matrices(self, h1: Tensor) -> list[Tensor]:
        """``h1`` [B, blocks, d_h] -> per block Phi_i [B, d_w, d_w]."""
        batch = h1.shape[0]
        return [layer(h1[:, i]).reshape(batch, self.rank, self.rank) for i, layer in enumerate(self.phi)]

    def forward(self, h1: Tensor) -> list[LowRankUpdate]:
        """``h1`` [B, blocks, d_h] -> one :class:`LowRankUpdate` per block."""
        return [
            LowRankUpdate(down=torch.einsum("cr,bsr->bcs", self.Q, phi), up=self.P, dense=self.dense)  # Q Phi^T
            for phi in self.phi_matrices(h1)
        ]


def materialised_qkv(x: Tensor, weight: Tensor, bias: Tensor | None, update: LowRankUpdate) -> Tensor:
    """Reference dense computation ``x (W0 + P Phi Q^T)^T + b`` per sample; ``x`` [B, N, C]."""
    weights = weight.unsqueeze(0) + update.materialise().to(weight.dtype)  # [B, 3C, C]
    out = torch.bmm(x, weights.transpose(1, 2).to(x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


def linear_with_update(x: Tensor, layer: nn.Linear, update: LowRankUpdate | None) -> Tensor:
    """``layer(x)`` plus the sample's low-rank update when there is one; ``x`` [B, ..., C_in].

    The result has ``F.linear``'s dtype: bf16 under autocast, ``x``'s dtype otherwise.
    """
    out = F.linear(x, layer.weight, layer.bias)  # [B, ..., C_out]
    if update is None:
        return out
    if update.dense:
        return out + update(x).to(out.dtype)
    # Accumulate into the static output in place: one [B, N, r] temporary instead of a second [B, N, 3C].
    # NOTE: the update is computed in the output's dtype. Under autocast ``out`` is bf16 while ``x`` (after a
    # LayerNorm), ``down`` and ``up`` may be fp32, and an in-place op cannot change its output's dtype.
    dtype, batch, c_out = out.dtype, x.shape[0], out.shape[-1]
    low = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(dtype), update.down.to(dtype))  # [B, N, r]
    # One [B*N, r] x [r, C_out] GEMM: ``up`` is shared by the batch, so no per-sample expand is needed.
    return out.view(-1, c_out).addmm_(low.view(-1, low.shape[-1]), update.up.to(dtype).t()).view(out.shape)
