"""ViTDet-style plain ViT backbone whose qkv projections can take language adaptive updates (spec item 4).

Parameter names follow timm's ``VisionTransformerSAM`` (``patch_embed.proj``, ``pos_embed`` as [1, H, W, C],
``blocks.i.attn.qkv`` / ``rel_pos_h`` / ``rel_pos_w`` / ``proj``, ``norm1``, ``norm2``, ``mlp.fc1`` /
``mlp.fc2``) so that SAM, ViTDet and plain ViT weights map onto it with few renames (see :mod:`vglaw.weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, PatchEmbed
from torch import Tensor, nn

from vglaw.adaptive import LowRankUpdate, linear_with_update


def relative_position_table(rel_pos: Tensor, size: int) -> Tensor:
    """Gather a [2*size-1, c] table into the [size, size, c] embeddings for every (query, key) pair."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table has {rel_pos.shape[0]} rows, expected {2 * size - 1}")
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


def decomposed_rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, height: int, width: int) -> Tensor:
    """MViTv2 decomposed relative position bias for ``q`` [B, heads, H*W, c] -> [B, heads, H*W, H*W]."""
    rh = relative_position_table(rel_pos_h, height).to(q.dtype)  # [H, H, c]
    rw = relative_position_table(rel_pos_w, width).to(q.dtype)  # [W, W, c]
    b, heads, _, c = q.shape
    r_q = q.reshape(b, heads, height, width, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # [B, n, H, W, H]
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # [B, n, H, W, W]
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # [B, n, H, W, H, W]
    # NOTE: in q's dtype whatever autocast chose for the einsums: SDPA takes a float mask only in the query's dtype.
    return bias.reshape(b, heads, height * width, height * width).to(q.dtype)


def sincos_pos_embed(grid: int, dim: int) -> Tensor:
    """2-D sine-cosine position embedding [1, grid, grid, dim]: half the channels encode y, half x."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embedding needs a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float64)
    angles = coords[:, None] * freqs[None, :]  # [grid, dim/4]
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid, dim/2]
    y = axis[:, None, :].expand(grid, grid, dim // 2)
    x = axis[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([y, x], dim=-1).unsqueeze(0).float()


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] with H, W multiples of ``window`` -> [B * nW, window, window, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_unpartition(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: [B * nW, window, window, C] -> [B, height, width, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


class Attention(nn.Module):
    """Multi-head self-attention over a (window of a) token grid, through ``scaled_dot_product_attention``."""

    def __init__(self, *, dim: int, num_heads: int, rel_pos_size: int | None, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # W0: the static part of the dynamic projection
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = rel_pos_size is not None
        if rel_pos_size is not None:
            # NOTE: zero-initialised as in ViTDet, so weights that carry no table start without a bias.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))

    def forward(self, x: Tensor, window: int, update: LowRankUpdate | None = None) -> Tensor:
        """``x`` [B, H, W, C] (already normalised) -> [B, H, W, C]; ``window`` 0 means global attention."""
        _, h, w, c = x.shape
        if window:
            # Pad the input, not the qkv, so padded tokens see exactly what ViTDet/SAM give them.
            pad_h, pad_w = (-h) % window, (-w) % window
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = x.shape[1], x.shape[2]
        # The projection is per token, so it runs on the whole grid with the sample's own weights.
        qkv = linear_with_update(x, self.qkv, update)  # [B, Hp, Wp, 3C]
        if window:
            qkv = window_partition(qkv, window)  # [B*nW, win, win, 3C]
        gh, gw = qkv.shape[1], qkv.shape[2]
        qkv = qkv.reshape(-1, gh * gw, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B*nW, heads, N, c]
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, gh, gw) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B*nW, heads, N, c]
        out = out.transpose(1, 2).reshape(-1, gh, gw, c)
        if window:
            out = window_unpartition(out, window, hp, wp)[:, :h, :w]
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block with window or global attention."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        rel_pos_size: int | None,
        drop_path: float,
        norm_layer: type[nn.Module] | partial[nn.Module],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim=dim, num_heads=num_heads, rel_pos_size=rel_pos_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, update: LowRankUpdate | None = None) -> Tensor:
        """``x`` [B, H, W, C] -> [B, H, W, C]."""
        x = x + self.drop_path(self.attn(self.norm1(x), self.window_size, update))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchConvEmbed(nn.Module):
    """ViTDet's patch projection with a convolutional branch beside it, for a ViT trained from scratch.

    Each token is ``patch(image) + out(convs(image))``: ``patch`` is :class:`PatchEmbed`'s linear projection of
    the token's 16 x 16 pixels, which keeps where in the patch every pixel lies (what boxes and masks are made
    of); ``convs`` are log2(patch_size) 3x3 stride-2 convolutions, each with a LayerNorm over channels and a GELU,
    widening to ``embed_dim`` (..., C/4, C/2, C), and ``out`` a linear map: the early convolutions of Xiao et
    al., "Early Convolutions Help Transformers See Better" (NeurIPS 2021), which learn edges and corners, so
    shapes, much sooner than a patch projection does from a random start. Same stride and output as
    ``PatchEmbed`` ([B, S/p, S/p, C], NHWC). Not in the paper, whose ViT comes pretrained with a patch projection
    (``VisionConfig.stem`` chooses it).
    """

    def __init__(self, *, image_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch = PatchEmbed(
            img_size=image_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim, output_fmt="NHWC"
        )
        depth = patch_size.bit_length() - 1  # patch_size is a power of 2
        widths = [max(embed_dim >> (depth - 1 - i), 8) for i in range(depth)]
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), LayerNorm2d(width), nn.GELU()]
            channels = width
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(channels, embed_dim)  # a 1x1 projection, on channels-last features

    def forward(self, images: Tensor) -> Tensor:
        return self.patch(images) + self.out(self.convs(images).permute(0, 2, 3, 1))  # [B, h, w, C]


class ViTDetBackbone(nn.Module):
    """Plain ViT adapted to detection resolution as in ViTDet: stride 16, no final norm, no class token.

    ``forward`` returns features [B, C, H/16, W/16] (``out_channels`` and ``stride`` declare them).
    """

    stride: int

    def __init__(
        self,
        *,
        image_size: int = 448,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 14,
        global_blocks: Sequence[int] = (2, 5, 8, 11),
        use_rel_pos: bool = True,
        drop_path: float = 0.1,
        norm_eps: float = 1e-6,
        stem: str = "patch",
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.stride = patch_size
        self.out_channels = embed_dim
        grid = image_size // patch_size
        self.patch_embed: nn.Module
        if stem == "patch+conv":
            self.patch_embed = PatchConvEmbed(image_size=image_size, patch_size=patch_size, embed_dim=embed_dim)
        else:
            self.patch_embed = PatchEmbed(
                img_size=image_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim, output_fmt="NHWC"
            )
        # At the input grid. NOTE: initialised with fixed 2-D sine-cosine values, as MAE does: a model trained
        # from scratch then knows where every token is from step 0, which box regression needs.
        self.pos_embed = nn.Parameter(sincos_pos_embed(grid, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth decay rule
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            window = 0 if i in global_blocks else window_size
            self.blocks.append(
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    window_size=window,
                    rel_pos_size=(window or grid) if use_rel_pos else None,
                    drop_path=rates[i],
                    norm_layer=norm_layer,
                )
            )
        self.apply(_init_weights)

    def forward(self, images: Tensor, updates: Sequence[LowRankUpdate] | None = None) -> Tensor:
        """``images`` [B, 3, S, S] and one update per block (or None: the static backbone) -> [B, C, S/16, S/16]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}; "
                "letterbox them first (vglaw.geometry.Letterbox)"
            )
        if updates is not None and len(updates) != len(self.blocks):
            raise ValueError(f"got {len(updates)} qkv updates for {len(self.blocks)} blocks")
        x = self.patch_embed(images) + self.pos_embed  # [B, h, w, C]
        for i, block in enumerate(self.blocks):
            x = block(x, None if updates is None else updates[i])
        return x.permute(0, 3, 1, 2)  # [B, C, h, w]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
