"""Tests for vglaw.geometry: letterbox round trips, image modes and horizontal flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vglaw.geometry import (
    Letterbox,
    cxcywh_to_xyxy,
    hflip_box_cxcywh_normalized,
    hflip_box_xyxy,
    hflip_image,
    hflip_mask,
    hflip_sample,
    swap_spatial_words,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)

SIZE = 448
ODD_SIZES = [(37, 500), (500, 37), (1024, 200), (200, 1024), (640, 640), (333, 517), (1, 1)]


def _random_boxes_xyxy(rng: np.random.Generator, w: int, h: int, n: int) -> np.ndarray:
    xs = np.sort(rng.uniform(0, w, size=(n, 2)), axis=1)
    ys = np.sort(rng.uniform(0, h, size=(n, 2)), axis=1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)  # [n, 4]


def _ellipse_mask(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
    ax, ay = rng.uniform(0.35, 0.5) * w, rng.uniform(0.35, 0.5) * h
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1  # [h, w] bool


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---- Letterbox.fit -------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", ODD_SIZES)
def test_fit_fills_longer_side_and_centres(w: int, h: int) -> None:
    lb = Letterbox.fit(w, h, SIZE)
    assert max(lb.new_w, lb.new_h) == SIZE
    assert lb.pad_x == (SIZE - lb.new_w) // 2 and lb.pad_y == (SIZE - lb.new_h) // 2
    assert lb.scale_x == pytest.approx(lb.new_w / w) and lb.scale_y == pytest.approx(lb.new_h / h)


def test_fit_known_values() -> None:
    lb = Letterbox.fit(640, 480, 448)
    assert (lb.new_w, lb.new_h, lb.pad_x, lb.pad_y) == (448, 336, 0, 56)
    # A side that would round to zero stays at one pixel.
    thin = Letterbox.fit(1, 5000, 448)
    assert (thin.new_w, thin.new_h) == (1, 448)


@pytest.mark.parametrize(
    "args", [(0, 10, 448), (10, -1, 448), (10, 10, 0), (10.0, 10, 448), (True, 10, 448), (10, 10, "448")]
)
def test_fit_rejects_bad_inputs(args: tuple) -> None:
    with pytest.raises(ValueError):
        Letterbox.fit(*args)


# ---- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "RGB", "LA", "I"])
@pytest.mark.parametrize("w,h", [(37, 500), (1024, 200), (640, 640)])
def test_image_any_mode_becomes_rgb_canvas(mode: str, w: int, h: int) -> None:
    img = Image.new(mode, (w, h))
    lb = Letterbox.fit(w, h, SIZE)
    out = lb.image(img)
    assert out.mode == "RGB" and out.size == (SIZE, SIZE)


def test_image_content_lands_in_valid_region_and_padding_is_fill() -> None:
    lb = Letterbox.fit(100, 50, 200)
    out = np.asarray(lb.image(Image.new("RGB", (100, 50), (255, 255, 255)), fill=(10, 20, 30)))
    inside = out[lb.pad_y : lb.pad_y + lb.new_h, lb.pad_x : lb.pad_x + lb.new_w]
    assert (inside == 255).all()
    assert (out[: lb.pad_y] == (10, 20, 30)).all() and (out[lb.pad_y + lb.new_h :] == (10, 20, 30)).all()


def test_rgba_is_composited_over_fill() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    out = np.asarray(Letterbox.fit(4, 4, 8).image(img, fill=(0, 0, 0)))
    assert (out == 0).all()


def test_image_rejects_wrong_size() -> None:
    with pytest.raises(ValueError):
        Letterbox.fit(10, 20, 32).image(Image.new("RGB", (20, 10)))


# ---- boxes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", ODD_SIZES)
def test_box_round_trip_numpy_and_torch(w: int, h: int) -> None:
    rng = np.random.default_rng(w * 7919 + h)
    lb = Letterbox.fit(w, h, SIZE)
    boxes = _random_boxes_xyxy(rng, w, h, 16)  # [16, 4]
    canvas = lb.box_to_canvas(boxes)
    assert isinstance(canvas, np.ndarray)
    assert (canvas >= -1e-6).all() and (canvas <= SIZE + 1e-6).all()
    np.testing.assert_allclose(lb.box_from_canvas(canvas), boxes, atol=1e-6)
    t = torch.from_numpy(boxes).float().reshape(4, 4, 4)  # extra leading dims
    back = lb.box_from_canvas(lb.box_to_canvas(t))
    assert isinstance(back, torch.Tensor) and back.shape == (4, 4, 4)
    assert (back - t).abs().max() < 1.0  # within a pixel (float32)
    assert (back - t).abs().max() < 1e-3


def test_box_to_canvas_known_values() -> None:
    lb = Letterbox.fit(200, 100, 400)  # scale 2, pad_y 100
    np.testing.assert_allclose(lb.box_to_canvas(np.array([0.0, 0, 200, 100])), [0, 100, 400, 300])
    np.testing.assert_allclose(lb.box_to_canvas(np.array([10, 20, 30, 40])), [20, 140, 60, 180])  # int input


@pytest.mark.parametrize("w,h", ODD_SIZES)
def test_normalized_cxcywh_round_trip(w: int, h: int) -> None:
    rng = np.random.default_rng(h * 31 + w)
    lb = Letterbox.fit(w, h, SIZE)
    xyxy = _random_boxes_xyxy(rng, w, h, 8)
    norm = lb.box_to_normalized_cxcywh(xyxy_to_xywh(xyxy))
    assert ((norm >= -1e-9) & (norm <= 1 + 1e-9)).all()
    np.testing.assert_allclose(lb.box_from_normalized_cxcywh(norm), xyxy, atol=1e-6)
    back_t = lb.box_from_normalized_cxcywh(torch.from_numpy(norm))
    assert isinstance(back_t, torch.Tensor)
    np.testing.assert_allclose(back_t.numpy(), xyxy, atol=1e-6)


def test_box_from_normalized_is_clipped_to_image() -> None:
    lb = Letterbox.fit(100, 50, 100)  # image occupies rows 25..75 of the canvas
    out = lb.box_from_normalized_cxcywh(np.array([0.5, 0.5, 1.0, 1.0]))  # the whole canvas
    np.testing.assert_allclose(out, [0, 0, 100, 50])


def test_format_conversions_are_inverse() -> None:
    rng = np.random.default_rng(0)
    xyxy = _random_boxes_xyxy(rng, 300, 200, 10)
    np.testing.assert_allclose(xywh_to_xyxy(xyxy_to_xywh(xyxy)), xyxy, atol=1e-9)
    np.testing.assert_allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-9)
    np.testing.assert_allclose(xyxy_to_cxcywh(np.array([0.0, 0, 4, 2])), [2, 1, 4, 2])
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(xyxy_to_xywh(t), torch.tensor([[1.0, 2.0, 2.0, 2.0]]))
    with pytest.raises(ValueError):
        xyxy_to_xywh(np.zeros((3, 5)))


# ---- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", ODD_SIZES)
def test_mask_round_trip_keeps_iou(w: int, h: int) -> None:
    # NOTE: a binary canvas snaps every object edge to the canvas grid, so the round trip moves an edge
    # by up to half a canvas pixel. Where the canvas has only 33 (37x500) or 88 (1024x200) pixels across,
    # a single mask can lose ~3% IoU when both of its edges land on a bad phase; we require the mean over
    # random blobs to stay above 0.99 and every mask above 0.96 (per-mask 0.99 where resolution allows).
    rng = np.random.default_rng(w + 1000 * h)
    lb = Letterbox.fit(w, h, SIZE)
    ious = []
    for _ in range(1 if (w, h) == (1, 1) else 10):
        mask = np.ones((1, 1), bool) if (w, h) == (1, 1) else _ellipse_mask(rng, w, h)
        canvas = lb.mask_to_canvas(mask)
        assert canvas.dtype == np.uint8 and canvas.shape == (SIZE, SIZE)
        assert set(np.unique(canvas)) <= {0, 1}
        back = lb.mask_from_canvas(canvas.astype(np.float32))
        assert back.shape == (h, w) and back.dtype == np.float32
        ious.append(_iou(mask, back >= 0.5))
    assert np.mean(ious) > 0.99
    assert min(ious) > (0.99 if min(lb.new_w, lb.new_h) >= 256 else 0.96)


@pytest.mark.parametrize("w,h", ODD_SIZES)
def test_soft_mask_round_trip_keeps_every_iou_above_099(w: int, h: int) -> None:
    """With coverage kept on the canvas, every mask survives the round trip, even 33 canvas pixels across."""
    rng = np.random.default_rng(w + 1000 * h)
    lb = Letterbox.fit(w, h, SIZE)
    for _ in range(1 if (w, h) == (1, 1) else 10):
        mask = np.ones((1, 1), bool) if (w, h) == (1, 1) else _ellipse_mask(rng, w, h)
        canvas = lb.mask_to_canvas(mask, soft=True)
        assert canvas.dtype == np.float32 and canvas.min() >= 0 and canvas.max() <= 1
        assert _iou(mask, lb.mask_from_canvas(canvas) >= 0.5) > 0.99


@pytest.mark.parametrize("w,h", [(37, 500), (1024, 200), (640, 480)])
def test_box_mask_round_trip(w: int, h: int) -> None:
    rng = np.random.default_rng(5)
    lb = Letterbox.fit(w, h, SIZE)
    for x0, y0, x1, y1 in _random_boxes_xyxy(rng, w, h, 6):
        mask = np.zeros((h, w), np.uint8)
        mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = 1
        back = lb.mask_from_canvas(lb.mask_to_canvas(mask).astype(np.float32)) >= 0.5
        # Each of the four edges may move by at most one original pixel.
        ys, xs = np.nonzero(back)
        assert abs(xs.min() - int(x0)) <= 1 and abs(xs.max() + 1 - int(np.ceil(x1))) <= 1
        assert abs(ys.min() - int(y0)) <= 1 and abs(ys.max() + 1 - int(np.ceil(y1))) <= 1


@pytest.mark.parametrize("size", [16, 37, 448, 1024])  # shrinking and enlarging
def test_mask_to_canvas_equals_the_full_image_resize(size: int) -> None:
    """Resampling only the object's neighbourhood gives the full resize's coverage (to float rounding)."""
    rng = np.random.default_rng(size)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(3, 700, size=2))
        lb = Letterbox.fit(w, h, size)
        mask = np.zeros((h, w), bool)
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))  # boxes touching the far edges included
        mask[y0 : y0 + int(rng.integers(1, h + 1)), x0 : x0 + int(rng.integers(1, w + 1))] = True
        mask &= rng.random((h, w)) > 0.2  # ragged edges and holes
        full = np.asarray(
            Image.fromarray(mask.astype(np.float32), mode="F").resize((lb.new_w, lb.new_h), Image.Resampling.BILINEAR)
        )
        inner = (slice(lb.pad_y, lb.pad_y + lb.new_h), slice(lb.pad_x, lb.pad_x + lb.new_w))
        soft = lb.mask_to_canvas(mask, soft=True)
        np.testing.assert_allclose(soft[inner], np.clip(full, 0, 1), atol=1e-4)
        assert float(soft.sum(dtype=np.float64)) == pytest.approx(
            float(np.clip(full, 0, 1).sum(dtype=np.float64)), rel=1e-5
        )
        binary = lb.mask_to_canvas(mask)
        flipped = binary[inner] != (full >= 0.5)
        assert np.all(np.abs(full[flipped] - 0.5) < 1e-4)  # only exact ties may threshold the other way
    assert not lb.mask_to_canvas(np.zeros((h, w), bool)).any()


def test_mask_padding_is_zero_and_canvas_matches_box() -> None:
    lb = Letterbox.fit(200, 100, 400)
    mask = np.zeros((100, 200), bool)
    mask[10:30, 50:150] = True
    canvas = lb.mask_to_canvas(mask)
    ys, xs = np.nonzero(canvas)
    x0, y0, x1, y1 = lb.box_to_canvas(np.array([50.0, 10, 150, 30]))
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (x0, x1, y0, y1)


def test_mask_from_canvas_torch_batched() -> None:
    lb = Letterbox.fit(1024, 200, SIZE)
    probs = torch.rand(2, 3, SIZE, SIZE)
    out = lb.mask_from_canvas(probs)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 200, 1024)
    single = lb.mask_from_canvas(probs[1, 2].numpy())
    np.testing.assert_allclose(out[1, 2].numpy(), single, atol=1e-6)


def test_mask_shape_checks() -> None:
    lb = Letterbox.fit(30, 20, 64)
    with pytest.raises(ValueError):
        lb.mask_to_canvas(np.zeros((30, 20), bool))
    with pytest.raises(ValueError):
        lb.mask_from_canvas(np.zeros((32, 32), np.float32))


# ---- horizontal flip -----------------------------------------------------------------------------

TRICKY_SENTENCES = [
    "man on the left",
    "Left guy",
    "LEFT ZEBRA NEXT TO RIGHT ONE",
    "leftmost person, right-most chair",
    "the left-hand side of the Right-Handed pitcher",
    "lefthand glove and righthand glove",
    "leftside tree, rightside bush, leftward car, rightwards bike",
    "bright light near the copyright sign, upright pole",
    "alright the righteous man rightly stands",
    "lefty on the top-left, bottom-right corner",
    "left.right,left;right!",
    "LeFt is odd casing; Right is fine",
    "  double  spaces left  ",
    "",
    "leftright rightleft lefts rights",
]


@pytest.mark.parametrize("text", TRICKY_SENTENCES)
def test_swap_spatial_words_is_an_involution(text: str) -> None:
    assert swap_spatial_words(swap_spatial_words(text)) == text


@pytest.mark.parametrize(
    "text,expected",
    [
        ("man on the left", "man on the right"),
        ("Left guy", "Right guy"),
        ("LEFT ZEBRA", "RIGHT ZEBRA"),
        ("leftmost person, right-most chair", "rightmost person, left-most chair"),
        ("Right-Handed pitcher", "Left-Handed pitcher"),
        ("lefthand glove, RIGHTHAND glove", "righthand glove, LEFTHAND glove"),
        ("leftside, rightside, leftward, rightwards", "rightside, leftside, rightward, leftwards"),
        ("top-left, bottom-right", "top-right, bottom-left"),
        (
            "bright copyright upright alright righteous rightly",
            "bright copyright upright alright righteous rightly",
        ),
        ("lefty", "lefty"),  # a nickname, not a direction: left alone by design
        ("left.right,left", "right.left,right"),
    ],
)
def test_swap_spatial_words_examples(text: str, expected: str) -> None:
    assert swap_spatial_words(text) == expected


def test_flip_twice_is_identity() -> None:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(hflip_image(hflip_image(img))), np.asarray(img))
    t = torch.rand(2, 3, 20, 30)
    assert torch.equal(hflip_image(hflip_image(t)), t)
    box = rng.uniform(0, 1, (5, 4))
    np.testing.assert_allclose(hflip_box_cxcywh_normalized(hflip_box_cxcywh_normalized(box)), box, atol=1e-12)
    xyxy = _random_boxes_xyxy(rng, 30, 20, 5)
    np.testing.assert_allclose(hflip_box_xyxy(hflip_box_xyxy(xyxy, 30), 30), xyxy, atol=1e-12)
    mask = rng.random((20, 30)) > 0.5
    assert np.array_equal(hflip_mask(hflip_mask(mask)), mask)
    assert torch.equal(hflip_mask(hflip_mask(torch.from_numpy(mask))), torch.from_numpy(mask))


def test_flip_mirrors_image_box_and_mask_consistently() -> None:
    size = 64
    img = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = 5, 10, 20, 40  # an asymmetric box on the left
    img[y0:y1, x0:x1] = 255
    mask[y0:y1, x0:x1] = 1
    box = xyxy_to_cxcywh(np.array([x0, y0, x1, y1], dtype=np.float64)) / size
    f_img, f_box, f_mask, f_text = hflip_sample(Image.fromarray(img), box, mask, "the Left box")
    assert f_text == "the Right box"
    fx0, fy0, fx1, fy1 = np.rint(cxcywh_to_xyxy(f_box * size)).astype(int)
    assert (fx0, fy0, fx1, fy1) == (size - x1, y0, size - x0, y1)
    expected = np.zeros_like(mask)
    expected[fy0:fy1, fx0:fx1] = 1
    assert np.array_equal(f_mask, expected)
    assert np.array_equal(np.asarray(f_img)[..., 0] // 255, expected)
    np.testing.assert_allclose(hflip_box_xyxy(np.array([x0, y0, x1, y1]), size), [fx0, fy0, fx1, fy1])


def test_hflip_sample_passes_none_through() -> None:
    img = torch.rand(3, 8, 8)
    f_img, f_box, f_mask, f_text = hflip_sample(img, None, None, "right")
    assert f_box is None and f_mask is None and f_text == "left"
    assert torch.equal(f_img, img.flip(-1))
