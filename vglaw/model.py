"""VG-LAW: an expression-specific visual backbone and a multi-task head, with no cross-modal fusion module."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from vglaw.adaptive import LanguageAdaptiveWeights, LanguageFeatureAggregation, LowRankUpdate
from vglaw.config import VGLAWConfig
from vglaw.heads import BoxHead, MaskHead
from vglaw.language import LanguageBackbone
from vglaw.vision import ViTDetBackbone


@dataclass
class VGLAWOutput:
    """Named predictions; a branch that the model does not have is None.

    Every field is float32 under bf16 autocast too: the heads end in fp32 (sigmoid, softmax, mask upsampling) and
    the ViT's residual stream stays fp32, so the losses and metrics never see bf16 rounding of the outputs.
    """

    boxes: Tensor | None  # [B, 4] (cx, cy, w, h) in [0, 1] of the padded input canvas
    mask_logits: Tensor | None  # [B, S, S] at the input resolution; sigmoid gives the mask probability
    visual_features: Tensor  # [B, C, S/16, S/16]
    box_attention: Tensor | None = None  # [B, S/16, S/16] LAP's attention over the feature map (sums to 1)
    category_logits: Tensor | None = None  # [B, categories] with ``head.categories`` > 0 (a training aid)


class VGLAW(nn.Module):
    """Language adaptive weights for multi-task visual grounding (Su et al., CVPR 2023)."""

    def __init__(self, config: VGLAWConfig) -> None:
        super().__init__()
        self.config = config
        v, t, a, h = config.vision, config.text, config.adaptive, config.head
        self.language = LanguageBackbone(
            vocab_size=t.vocab_size,
            num_layers=t.num_layers,
            hidden_size=t.hidden_size,
            num_attention_heads=t.num_attention_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            init_std=t.init_std,
        )
        self.visual = ViTDetBackbone(
            image_size=v.image_size,
            patch_size=v.patch_size,
            embed_dim=v.embed_dim,
            depth=v.depth,
            num_heads=v.num_heads,
            mlp_ratio=v.mlp_ratio,
            window_size=v.window_size,
            global_blocks=v.global_blocks,
            use_rel_pos=v.use_rel_pos,
            drop_path=v.drop_path,
            norm_eps=v.norm_eps,
            stem=v.stem,
        )
        self.aggregation: LanguageFeatureAggregation | None = None
        self.weight_generator: LanguageAdaptiveWeights | None = None
        if a.enabled:
            self.aggregation = LanguageFeatureAggregation(
                num_blocks=v.depth, text_dim=t.hidden_size, groups=a.groups, reduction=a.reduction
            )
            self.weight_generator = LanguageAdaptiveWeights(
                num_blocks=v.depth, embed_dim=v.embed_dim, hidden_dim=self.aggregation.out_dim, rank=a.rank
            )
        self.box_head = (
            BoxHead(
                visual_dim=v.embed_dim,
                text_dim=t.hidden_size,
                key_dim=h.pool_dim,
                hidden_dim=h.box_hidden,
                categories=h.categories,
            )
            if "rec" in h.tasks
            else None
        )
        self.mask_head = (
            MaskHead(visual_dim=v.embed_dim, text_dim=t.hidden_size, hidden_dim=h.mask_hidden)
            if "res" in h.tasks
            else None
        )

    def qkv_updates(self, text: Tensor, text_mask: Tensor) -> list[LowRankUpdate] | None:
        """The expression-specific low-rank qkv updates, one per ViT block (None for the static ablation)."""
        if self.aggregation is None or self.weight_generator is None:
            return None
        return self.weight_generator(self.aggregation(text, text_mask))

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> VGLAWOutput:
        """Ground expressions in images.

        Args:
            images: normalised letterboxed images [B, 3, S, S] (see :func:`vglaw.transforms.normalize`).
            input_ids: token ids [B, L] starting with [CLS].
            attention_mask: [B, L], True (or 1) for real tokens.
        """
        mask = attention_mask.bool()
        text = self.language(input_ids, mask)  # [B, L, d_l]
        cls = text[:, 0]  # F_l^1, [B, d_l]
        features = self.visual(images, self.qkv_updates(text, mask))  # [B, C, h, w]
        boxes = attention = categories = None
        if self.box_head is not None:
            boxes, attention, categories = self.box_head(features, cls)
        masks = self.mask_head(features, cls, out_size=tuple(images.shape[-2:])) if self.mask_head is not None else None
        return VGLAWOutput(
            boxes=boxes,
            mask_logits=masks,
            visual_features=features,
            box_attention=attention,
            category_logits=categories,
        )

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The visual and language backbones (the paper trains them at a 10x lower learning rate)."""
        yield from self.visual.parameters()
        yield from self.language.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Everything that is not a backbone: the weight generator and the multi-task head."""
        backbone = {id(p) for p in self.backbone_parameters()}
        yield from (p for p in self.parameters() if id(p) not in backbone)
