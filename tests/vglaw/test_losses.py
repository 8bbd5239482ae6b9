"""Tests for vglaw.losses against independent reference computations."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou

from vglaw.losses import (
    GroundingLoss,
    LossWeights,
    attention_loss,
    category_loss,
    detection_loss,
    segmentation_loss,
)


def _random_cxcywh(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, 4, generator=gen) * torch.tensor([1.0, 1.0, 0.5, 0.5]) + torch.tensor([0, 0, 0.01, 0.01])


def _xyxy(box: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def _focal_reference(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    x, t = logits.double(), target.double()
    p = 1 / (1 + torch.exp(-x))
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean()


def _dice_reference(logits: torch.Tensor, target: torch.Tensor) -> float:
    total = 0.0
    for x, t in zip(logits.double(), target.double()):
        p = 1 / (1 + torch.exp(-x))
        total += 1 - (2 * float((p * t).sum()) + 1) / (float(p.sum()) + float(t.sum()) + 1)
    return total / logits.shape[0]


# ---- LossWeights ---------------------------------------------------------------------------------


def test_loss_weights_defaults_follow_the_paper() -> None:
    w = LossWeights()
    assert (w.l1, w.giou, w.focal, w.dice, w.focal_alpha, w.focal_gamma) == (1, 1, 4, 4, 0.25, 2)
    assert w.attention == 0 and w.category == 0  # not in the paper: off unless a config turns them on


@pytest.mark.parametrize(
    "kwargs",
    [
        {"l1": -1.0},
        {"dice": math.nan},
        {"giou": math.inf},
        {"focal_alpha": 1.5},
        {"focal_gamma": -0.1},
        {"focal": "4"},
    ],
)
def test_loss_weights_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LossWeights(**kwargs)


# ---- detection -----------------------------------------------------------------------------------


def test_detection_loss_matches_references() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = _random_cxcywh(gen, 16), _random_cxcywh(gen, 16)
    out = detection_loss(pred, target, LossWeights(l1=2.0, giou=3.0))
    l1_ref = sum(float((p - t).abs().sum()) for p, t in zip(pred, target)) / 16
    giou_ref = float((1 - torch.diagonal(generalized_box_iou(_xyxy(pred), _xyxy(target)))).mean())
    assert float(out["l1"]) == pytest.approx(l1_ref, rel=1e-5)
    assert float(out["giou"]) == pytest.approx(giou_ref, rel=1e-5)
    assert float(out["loss_det"]) == pytest.approx(2 * l1_ref + 3 * giou_ref, rel=1e-5)
    assert giou_ref > 0.1  # the reference is not trivially zero


def test_detection_loss_perfect_overlap_is_zero() -> None:
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.7, 0.1, 0.1]])
    out = detection_loss(box, box.clone())
    assert float(out["l1"]) == 0.0
    # torchvision adds eps = 1e-7 to the denominators: relative to an area of 0.01 that is 1e-5.
    assert float(out["giou"]) == pytest.approx(0.0, abs=1e-4)


def test_detection_loss_disjoint_boxes_exceed_one() -> None:
    pred = torch.tensor([[0.1, 0.1, 0.1, 0.1]])
    target = torch.tensor([[0.9, 0.9, 0.1, 0.1]])
    assert float(detection_loss(pred, target)["giou"]) > 1.0


@pytest.mark.parametrize(
    "pred,target",
    [
        ([[0.5, 0.5, 0.0, 0.0]], [[0.5, 0.5, 0.0, 0.0]]),  # identical points
        ([[0.5, 0.5, 0.0, 0.2]], [[0.2, 0.3, 0.0, 0.0]]),  # line vs point
        ([[0.5, 0.5, 0.0, 0.0]], [[0.4, 0.4, 0.3, 0.3]]),  # point inside a box
        ([[0.5, 0.5, -0.1, 0.2]], [[0.5, 0.5, 0.2, 0.2]]),  # inverted prediction
    ],
)
def test_detection_loss_zero_area_boxes_are_finite(pred: list, target: list) -> None:
    p = torch.tensor(pred, requires_grad=True)
    out = detection_loss(p, torch.tensor(target))
    assert all(torch.isfinite(v) for v in out.values())
    out["loss_det"].backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_detection_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        detection_loss(torch.rand(4, 4), torch.rand(3, 4))
    with pytest.raises(ValueError):
        detection_loss(torch.rand(4, 5), torch.rand(4, 5))


# ---- segmentation --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.9, 1.5)])
def test_segmentation_loss_matches_references(alpha: float, gamma: float) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 16, 12, generator=gen) * 3
    target = (torch.rand(3, 16, 12, generator=gen) > 0.6).float()
    out = segmentation_loss(logits, target, LossWeights(focal=2.0, dice=5.0, focal_alpha=alpha, focal_gamma=gamma))
    focal_ref = float(_focal_reference(logits, target, alpha, gamma))
    dice_ref = _dice_reference(logits, target)
    assert float(out["focal"]) == pytest.approx(focal_ref, rel=1e-5)
    assert float(out["dice"]) == pytest.approx(dice_ref, rel=1e-5)
    assert float(out["loss_seg"]) == pytest.approx(2 * focal_ref + 5 * dice_ref, rel=1e-5)


def test_segmentation_loss_empty_masks() -> None:
    target = torch.zeros(2, 8, 8)
    logits = torch.full((2, 8, 8), -30.0, requires_grad=True)  # confidently empty prediction
    out = segmentation_loss(logits, target)
    assert out["dice"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["focal"].item() == pytest.approx(0.0, abs=1e-6)
    out["loss_seg"].backward()
    assert torch.isfinite(logits.grad).all()
    # A confident false positive on an empty target is penalised but stays finite.
    bad = segmentation_loss(torch.full((2, 8, 8), 30.0), target)
    assert 0.9 < float(bad["dice"]) < 1.0 and math.isfinite(float(bad["focal"]))


def test_segmentation_loss_perfect_prediction_is_near_zero() -> None:
    target = torch.zeros(1, 10, 10)
    target[0, 2:7, 3:8] = 1
    logits = (target * 2 - 1) * 30
    out = segmentation_loss(logits, target)
    assert float(out["dice"]) < 1e-6 and float(out["focal"]) < 1e-6


def test_segmentation_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        segmentation_loss(torch.rand(2, 8, 8), torch.rand(2, 8, 9))
    with pytest.raises(ValueError):
        segmentation_loss(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))


# ---- GroundingLoss -------------------------------------------------------------------------------


def _batch(seed: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    pred, target = _random_cxcywh(gen, 4), _random_cxcywh(gen, 4)
    logits = torch.randn(4, 16, 16, generator=gen)
    masks = (torch.rand(4, 16, 16, generator=gen) > 0.5).float()
    return pred, logits, target, masks


def test_grounding_loss_multi_task_total() -> None:
    pred, logits, target, masks = _batch()
    out = GroundingLoss()(pred, logits, target, masks)
    assert set(out) == {"l1", "giou", "loss_det", "focal", "dice", "loss_seg", "loss"}
    expected = out["l1"] + out["giou"] + 4 * out["focal"] + 4 * out["dice"]
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(float(out["loss_det"] + out["loss_seg"]), rel=1e-6)


def test_grounding_loss_rec_only_and_res_only() -> None:
    pred, logits, target, masks = _batch()
    loss = GroundingLoss()
    rec = loss(pred, None, target, None)
    assert set(rec) == {"l1", "giou", "loss_det", "loss"}
    assert torch.equal(rec["loss"], rec["loss_det"])
    res = loss(None, logits, None, masks)
    assert set(res) == {"focal", "dice", "loss_seg", "loss"}
    assert torch.equal(res["loss"], res["loss_seg"])


@pytest.mark.parametrize("which", ["none", "boxes_without_target", "target_without_boxes", "mask_without_target"])
def test_grounding_loss_rejects_inconsistent_inputs(which: str) -> None:
    pred, logits, target, masks = _batch()
    args = {
        "none": (None, None, None, None),
        "boxes_without_target": (pred, None, None, None),
        "target_without_boxes": (None, logits, target, masks),
        "mask_without_target": (pred, logits, target, None),
    }[which]
    with pytest.raises(ValueError):
        GroundingLoss()(*args)


def test_grounding_loss_computes_in_float32_from_bf16() -> None:
    pred, logits, target, masks = _batch()
    bf = [t.bfloat16() for t in (pred, logits, target, masks)]
    ref = GroundingLoss()(*(t.float() for t in bf))
    p, lg = bf[0].requires_grad_(), bf[1].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GroundingLoss()(p, lg, bf[2], bf[3])
    for key, value in out.items():
        assert value.dtype == torch.float32, key
        assert value.item() == pytest.approx(ref[key].item(), rel=1e-5), key
    out["loss"].backward()
    assert p.grad is not None and lg.grad is not None and lg.grad.dtype == torch.bfloat16


def test_grounding_loss_gradients_flow_to_both_heads() -> None:
    pred, logits, target, masks = _batch()
    pred.requires_grad_()
    logits.requires_grad_()
    GroundingLoss(LossWeights(l1=1.0, giou=1.0, focal=4.0, dice=4.0))(pred, logits, target, masks)["loss"].backward()
    assert pred.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def _masks_and_cells() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 8x8 masks over a 4x4 grid: one covering cells (0, 0) and (0, 1) fully, one empty."""
    masks = torch.zeros(2, 8, 8)
    masks[0, 0:2, 0:4] = 1
    cells = torch.zeros(2, 4, 4)
    cells[0, 0, 0:2] = 0.5
    return masks, cells


def test_attention_loss_is_cross_entropy_to_the_mask_share() -> None:
    masks, cells = _masks_and_cells()
    uniform = torch.full((2, 4, 4), 1 / 16)
    # The empty mask contributes nothing; uniform attention costs log(16).
    assert attention_loss(uniform, masks).item() == pytest.approx(math.log(16), rel=1e-6)
    on_target = cells.clone()
    on_target[1] = 1 / 16
    assert attention_loss(on_target, masks).item() == pytest.approx(math.log(2), rel=1e-6)
    logits = torch.randn(2, 16, requires_grad=True)
    attention_loss(logits.softmax(-1).reshape(2, 4, 4), masks).backward()
    assert logits.grad is not None and logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() == 0


def test_attention_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="attention_loss"):
        attention_loss(torch.full((2, 16), 1 / 16), torch.zeros(2, 8, 8))


def test_grounding_loss_adds_the_weighted_attention_term_only_when_asked() -> None:
    gen = torch.Generator().manual_seed(3)
    boxes, target = _random_cxcywh(gen, 2), _random_cxcywh(gen, 2)
    masks, _ = _masks_and_cells()
    logits = torch.randn(2, 8, 8, generator=gen)
    attention = torch.softmax(torch.randn(2, 16, generator=gen), -1).reshape(2, 4, 4)
    plain = GroundingLoss()(boxes, logits, target, masks, box_attention=attention)
    assert "attention" not in plain
    weighted = GroundingLoss(LossWeights(attention=2.0))(boxes, logits, target, masks, box_attention=attention)
    expected = plain["loss"] + 2.0 * attention_loss(attention, masks)
    torch.testing.assert_close(weighted["loss"], expected)
    rec_only = GroundingLoss(LossWeights(attention=1.0))(
        boxes, None, target, None, box_attention=attention, attention_masks=masks
    )
    torch.testing.assert_close(rec_only["loss"], rec_only["loss_det"] + rec_only["attention"])
    with pytest.raises(ValueError, match="attention loss needs"):
        GroundingLoss(LossWeights(attention=1.0))(boxes, logits, target, masks)


def test_category_loss_is_the_cross_entropy_of_the_referred_category() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    categories = torch.tensor([0, 2])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(3)) / 2
    loss = category_loss(logits, categories)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1, 2] < 0 < logits.grad[1, 0]  # raises the referred category, lowers the others
    with pytest.raises(ValueError, match="category_loss"):
        category_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_grounding_loss_adds_the_weighted_category_term_only_when_asked() -> None:
    gen = torch.Generator().manual_seed(4)
    boxes, target = _random_cxcywh(gen, 2), _random_cxcywh(gen, 2)
    logits = torch.randn(2, 5, generator=gen)
    categories = torch.tensor([1, 4])
    plain = GroundingLoss()(boxes, None, target, None, category_logits=logits, target_categories=categories)
    assert "category" not in plain
    weighted = GroundingLoss(LossWeights(category=0.5))(
        boxes, None, target, None, category_logits=logits, target_categories=categories
    )
    torch.testing.assert_close(weighted["loss"], plain["loss"] + 0.5 * category_loss(logits, categories))
    with pytest.raises(ValueError, match="category loss needs"):
        GroundingLoss(LossWeights(category=1.0))(boxes, None, target, None, category_logits=logits)
