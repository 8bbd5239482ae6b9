"""VG-LAW's training objective: L1 + GIoU for the box (REC), focal + dice for the mask (RES).

``L_total = L_det + L_seg`` with ``L_det = l1 * L1 + giou * GIoU`` and ``L_seg = focal * Focal + dice * Dice``
(weights 1, 1, 4, 4; focal alpha 0.25, gamma 2). Single-task models drop one branch. Every term is
computed in float32, whatever the dtype of the predictions, and outside autocast.

One term is not the paper's and is off by default: ``attention`` > 0 adds ``attention * L_att``, the
cross-entropy between LAP's attention and the referred object's share of each feature-map cell
(:func:`attention_loss`). The paper starts from a detector-pretrained ViT whose features already separate
objects; from a random initialisation the box branch otherwise stays at the mean box for thousands of steps,
because LAP's attention starts uniform and the box loss alone barely moves it (docs/training.md).

Another is off by default too: ``category`` > 0 adds ``category * L_cat``, the cross-entropy of the
referred object's category from the classifier on LAP's pooled feature (``head.categories`` > 0). It stands
in for the detector pre-training that teaches the paper's ViT what the categories look like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

__all__ = ["GroundingLoss", "LossWeights", "attention_loss", "category_loss", "detection_loss", "segmentation_loss"]


@dataclass
class LossWeights:
    """Weights of the loss terms and focal-loss parameters.

    Attributes:
        l1: Weight of the L1 box loss.
        giou: Weight of the GIoU box loss.
        focal: Weight of the focal mask loss.
        dice: Weight of the dice mask loss.
        focal_alpha: Focal-loss weight of positive pixels, in [0, 1].
        focal_gamma: Focal-loss focusing exponent, >= 0.
        attention: Weight of the LAP attention loss (not in the paper; 0 turns it off).
        category: Weight of the referred object's category loss (not in the paper; 0 turns it off).
    """

    l1: float = 1.0
    giou: float = 1.0
    focal: float = 4.0
    dice: float = 4.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    attention: float = 0.0
    category: float = 0.0

    def __post_init__(self) -> None:
        for name in ("l1", "giou", "focal", "dice", "focal_gamma", "attention", "category"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"LossWeights.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"LossWeights.{name} must be finite and >= 0, got {value}")
        alpha = self.focal_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"LossWeights.focal_alpha must be in [0, 1], got {alpha!r}")


def _cxcywh_to_xyxy(box: Tensor) -> Tensor:
    """Converts ``[..., 4]`` (cx, cy, w, h) to (x0, y0, x1, y1), clamping negative sizes to zero."""
    cx, cy, w, h = box.unbind(-1)
    # NOTE: the head's sigmoid keeps w, h >= 0; the clamp only guards GIoU against inverted boxes.
    w, h = w.clamp(min=0), h.clamp(min=0)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _check_pair(name: str, pred: Tensor, target: Tensor, ndim: int) -> None:
    if pred.ndim != ndim or pred.shape != target.shape:
        raise ValueError(
            f"{name}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} must have the same {ndim}-d shape"
        )


def detection_loss(pred_cxcywh: Tensor, target_cxcywh: Tensor, weights: LossWeights | None = None) -> dict[str, Tensor]:
    """Box losses of the REC branch.

    Args:
        pred_cxcywh: Predicted boxes ``[B, 4]``, (cx, cy, w, h) normalised to the canvas.
        target_cxcywh: Ground-truth boxes ``[B, 4]`` in the same format.
        weights: Loss weights; defaults to the paper's.

    Returns:
        ``"l1"``: L1 summed over the four coordinates, averaged over boxes; ``"giou"``: mean GIoU loss;
        ``"loss_det"``: their weighted sum. All float32 scalars.
    """
    weights = weights or LossWeights()
    _check_pair("detection_loss", pred_cxcywh, target_cxcywh, ndim=2)
    if pred_cxcywh.shape[-1] != 4:
        raise ValueError(f"detection_loss: boxes must be [B, 4], got {tuple(pred_cxcywh.shape)}")
    pred, target = pred_cxcywh.float(), target_cxcywh.float()  # [B, 4]
    l1 = (pred - target).abs().sum(dim=-1).mean()
    # NOTE: torchvision adds eps to both denominators, so zero-area boxes give finite values and grads.
    giou = generalized_box_iou_loss(_cxcywh_to_xyxy(pred), _cxcywh_to_xyxy(target), reduction="mean")
    return {"l1": l1, "giou": giou, "loss_det": weights.l1 * l1 + weights.giou * giou}


def segmentation_loss(mask_logits: Tensor, target: Tensor, weights: LossWeights | None = None) -> dict[str, Tensor]:
    """Mask losses of the RES branch.

    Args:
        mask_logits: Predicted logits ``[B, H, W]``.
        target: Ground-truth masks ``[B, H, W]`` with values in {0, 1} (any dtype).
        weights: Loss weights and focal parameters; defaults to the paper's.

    Returns:
        ``"focal"``: sigmoid focal loss, mean over pixels then over the batch; ``"dice"``:
        ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` per sample with ``p = sigmoid(logits)``, mean over
        the batch (an empty target with an empty prediction gives 0); ``"loss_seg"``: their weighted sum.
    """
    weights = weights or LossWeights()
    _check_pair("segmentation_loss", mask_logits, target, ndim=3)
    logits, tgt = mask_logits.float(), target.float()  # [B, H, W]
    focal_px = sigmoid_focal_loss(
        logits, tgt, alpha=weights.focal_alpha, gamma=weights.focal_gamma, reduction="none"
    )  # [B, H, W]
    focal = focal_px.flatten(1).mean(dim=1).mean()
    prob = logits.sigmoid().flatten(1)  # [B, H*W]
    tgt = tgt.flatten(1)  # [B, H*W]
    dice_per = 1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)  # [B]
    dice = dice_per.mean()
    return {"focal": focal, "dice": dice, "loss_seg": weights.focal * focal + weights.dice * dice}


def attention_loss(attention: Tensor, target_masks: Tensor) -> Tensor:
    """Cross-entropy from the referred object's spatial distribution to LAP's attention.

    Args:
        attention: LAP's attention ``[B, h, w]`` (a softmax over the ``h * w`` cells).
        target_masks: Ground-truth masks ``[B, H, W]`` in {0, 1}, ``H``, ``W`` multiples of ``h``, ``w``.

    Returns:
        ``-sum_i t_i log a_i`` averaged over samples, where ``t`` is the mask's area in each cell normalised
        to sum to one; samples with an empty mask contribute nothing. A float32 scalar.
    """
    if attention.ndim != 3 or target_masks.ndim != 3 or attention.shape[0] != target_masks.shape[0]:
        raise ValueError(
            f"attention_loss: attention {tuple(attention.shape)} and masks {tuple(target_masks.shape)} "
            "must be [B, h, w] and [B, H, W]"
        )
    cells = F.adaptive_avg_pool2d(target_masks.float().unsqueeze(1), attention.shape[-2:]).flatten(1)  # [B, hw]
    mass = cells.sum(dim=1, keepdim=True)  # [B, 1]
    target = cells / mass.clamp_min(1e-12)
    per_sample = -(target * attention.float().flatten(1).clamp_min(1e-12).log()).sum(dim=1)  # [B]
    present = (mass.squeeze(1) > 0).float()
    return (per_sample * present).sum() / present.sum().clamp_min(1.0)


def category_loss(logits: Tensor, categories: Tensor) -> Tensor:
    """Mean cross-entropy of the referred objects' category ids ``[B]`` under ``logits`` ``[B, K]``."""
    if logits.ndim != 2 or categories.shape != logits.shape[:1]:
        raise ValueError(
            f"category_loss: logits {tuple(logits.shape)} must be [B, K] and categories {tuple(categories.shape)} [B]"
        )
    return F.cross_entropy(logits.float(), categories.long())


class GroundingLoss(nn.Module):
    """The multi-task objective ``L_det + L_seg``; either branch may be absent (single-task models).

    Args:
        weights: Loss weights; defaults to the paper's.
    """

    def __init__(self, weights: LossWeights | None = None) -> None:
        super().__init__()
        self.weights = weights or LossWeights()

    def forward(
        self,
        pred_boxes: Tensor | None,
        mask_logits: Tensor | None,
        target_boxes: Tensor | None,
        target_masks: Tensor | None,
        box_attention: Tensor | None = None,
        attention_masks: Tensor | None = None,
        category_logits: Tensor | None = None,
        target_categories: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Computes every loss term.

        Args:
            pred_boxes: Predicted boxes ``[B, 4]`` (normalised cxcywh), or None without a REC branch.
            mask_logits: Mask logits ``[B, H, W]``, or None without a RES branch.
            target_boxes: Ground-truth boxes ``[B, 4]``; given exactly when ``pred_boxes`` is.
            target_masks: Ground-truth masks ``[B, H, W]``; given exactly when ``mask_logits`` is.
            box_attention: LAP's attention ``[B, h, w]``; needed when ``weights.attention`` > 0.
            attention_masks: The masks its target comes from; defaults to ``target_masks``.
            category_logits: The category classifier's logits ``[B, K]``; needed when ``weights.category`` > 0.
            target_categories: The referred objects' category ids ``[B]``, each in ``[0, K)``.

        Returns:
            The unweighted terms (``l1``, ``giou``, ``focal``, ``dice``, and ``attention`` and ``category``
            when weighted) of the present branches, the weighted ``loss_det`` / ``loss_seg``, and ``loss``,
            their sum (with the weighted ``attention`` and ``category`` added). All float32 scalars.

        Raises:
            ValueError: If no branch is present or a prediction lacks its target (or vice versa).
        """
        if (pred_boxes is None) != (target_boxes is None):
            raise ValueError("pred_boxes and target_boxes must both be given or both be None")
        if (mask_logits is None) != (target_masks is None):
            raise ValueError("mask_logits and target_masks must both be given or both be None")
        if pred_boxes is None and mask_logits is None:
            raise ValueError("GroundingLoss needs at least one branch (boxes or masks)")
        attention_masks = target_masks if attention_masks is None else attention_masks
        use_attention = self.weights.attention > 0
        if use_attention and (box_attention is None or attention_masks is None):
            raise ValueError("the attention loss needs box_attention and masks (target_masks or attention_masks)")
        use_category = self.weights.category > 0
        if use_category and (category_logits is None or target_categories is None):
            raise ValueError("the category loss needs category_logits (head.categories > 0) and target_categories")
        device = (pred_boxes if pred_boxes is not None else mask_logits).device
        out: dict[str, Tensor] = {}
        # NOTE: losses run in float32 outside autocast; bf16 sigmoid/log lose too much precision here.
        with torch.autocast(device_type=device.type, enabled=False):
            if pred_boxes is not None:
                out.update(detection_loss(pred_boxes, target_boxes, self.weights))
            if mask_logits is not None:
                out.update(segmentation_loss(mask_logits, target_masks, self.weights))
            out["loss"] = torch.stack([out[k] for k in ("loss_det", "loss_seg") if k in out]).sum()
            if use_attention:
                out["attention"] = attention_loss(box_attention, attention_masks)
                out["loss"] = out["loss"] + self.weights.attention * out["attention"]
            if use_category:
                out["category"] = category_loss(category_logits, target_categories)
                out["loss"] = out["loss"] + self.weights.category * out["category"]
        return out
