"""Predictor: original-pixel boxes and masks, batching, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vglaw import Grounding, Predictor, save_pretrained
from vglaw.geometry import Letterbox, cxcywh_to_xyxy
from vglaw.transforms import to_uint8_tensor


@pytest.fixture
def predictor(tiny_model, tokenizer) -> Predictor:
    return Predictor(tiny_model, tokenizer)


def test_single_prediction_lives_in_original_pixels(predictor) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    result = predictor.predict(image, "the small red circle")
    assert isinstance(result, Grounding)
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 <= x1 <= 500 and 0 <= y0 <= y1 <= 300
    assert result.mask.shape == (300, 500) and result.mask.dtype == bool
    assert result.mask_probs.shape == (300, 500) and result.mask_probs.dtype == np.float32
    np.testing.assert_array_equal(result.mask, result.mask_probs >= 0.35)
    np.testing.assert_allclose(result.box_normalized, np.array(result.box) / [500, 300, 500, 300])


def test_box_mapping_matches_the_letterbox_inverse(predictor) -> None:
    image = np.random.default_rng(1).integers(0, 255, (37, 500, 3), dtype=np.uint8)
    fit = Letterbox.fit(500, 37, predictor.image_size)
    raw = predictor.predict_canvas(to_uint8_tensor(fit.image(Image.fromarray(image)))[None], ["the circle"])
    expected = fit.box_from_canvas(cxcywh_to_xyxy(raw.boxes[0].numpy().astype(np.float64)) * predictor.image_size)
    expected = np.clip(expected, 0, [500, 37, 500, 37])
    np.testing.assert_allclose(predictor.predict(image, "the circle").box, expected, atol=1e-4)


def test_batches_and_broadcast(predictor, tokenizer) -> None:
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 80), (120, 40)]]
    results = predictor.predict(images, ["the red circle", "the rightmost shape"])
    assert [r.mask.shape for r in results] == [(64, 80), (120, 40)]
    one_by_one = [predictor.predict(im, t) for im, t in zip(images, ["the red circle", "the rightmost shape"])]
    for a, b in zip(results, one_by_one):
        np.testing.assert_allclose(a.box, b.box, atol=1e-4)
    broadcast = predictor.predict(images[0], ["the red circle", "the blue square", "a shape"])
    assert len(broadcast) == 3
    no_mask = predictor.predict(images[0], "the red circle", return_mask=False)
    assert no_mask.mask is None and no_mask.box is not None


def test_bad_input_is_a_clear_error(predictor) -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="non-empty"):
        predictor.predict(image, "   ")
    with pytest.raises(ValueError, match="2 images but 3 expressions"):
        predictor.predict([image, image], ["a", "b", "c"])
    long = predictor.predict(image, "the red circle " * 50)
    assert long.truncated


def test_from_pretrained_directory(tmp_path, tiny_model, tokenizer) -> None:
    save_pretrained(tiny_model, tokenizer, tmp_path)
    loaded = Predictor.from_pretrained(tmp_path)
    image = np.random.default_rng(3).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        loaded.predict(image, "the red circle").box,
        Predictor(tiny_model, tokenizer).predict(image, "the red circle").box,
    )
