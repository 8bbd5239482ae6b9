"""The model deployment's class without Serve: batches with bad items, failures, health, runtime settings."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.serve.model import GroundingItem, GroundingModel, ItemError, mask_payload
from pipelines.tracking.registry import model_identity
from tests.pipelines.serve_harness import save_tiny_model, shapes_image
from vglaw import Predictor
from vglaw.geometry import Letterbox


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve-model") / "model")


@pytest.fixture
def replica(model_dir: Path):
    """The deployment's class, constructed as Serve would, with the start-up user_config applied."""
    instance = GroundingModel.func_or_class(str(model_dir), "cpu")
    instance.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.01})
    return instance


def _item(image: Image.Image, expression: str, size: int = 128, **options) -> GroundingItem:
    fit = Letterbox.fit(image.width, image.height, size)
    return GroundingItem(np.asarray(fit.image(image)), fit, expression, **options)


def _queued(items: list) -> list[tuple[object, float]]:
    return [(item, 0.0) for item in items]


def test_a_bad_item_fails_alone(replica, model_dir: Path) -> None:
    images = [shapes_image(120, 90, seed=1), shapes_image(64, 160, seed=2)]
    good = [_item(images[0], "the small red circle"), _item(images[1], "the rightmost shape", mask_format="png")]
    bad = [
        GroundingItem(np.zeros((5, 5, 3), np.uint8), good[0].letterbox, "the circle"),
        _item(images[0], "   "),
        "not an item",
        _item(images[0], "the circle", threshold=2.0),
    ]
    outcomes = replica._run_batch(_queued([good[0], *bad, good[1]]))
    assert [o.batch_size for o in outcomes] == [6] * 6
    assert all(isinstance(o.error, ItemError) and o.error.status == 422 for o in outcomes[1:5])
    assert outcomes[2].error.code == "empty_expression"
    expected = Predictor.from_pretrained(model_dir).predict(images, ["the small red circle", "the rightmost shape"])
    for outcome, want in zip([outcomes[0], outcomes[5]], expected):
        assert outcome.error is None
        np.testing.assert_allclose(outcome.box, want.box, atol=1e-3)
        assert outcome.mask_area == int(want.mask.sum())
    rle = outcomes[0].mask
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), expected[0].mask)
    png = Image.open(io.BytesIO(base64.b64decode(outcomes[5].mask["data"])))
    np.testing.assert_array_equal(np.asarray(png) > 0, expected[1].mask)


def test_a_failing_forward_is_retried_item_by_item(replica, monkeypatch: pytest.MonkeyPatch) -> None:
    original = replica.predictor.predict_letterboxed

    def poisoned(canvases, letterboxes, expressions, **kwargs):
        if any("poison" in text for text in expressions):
            raise RuntimeError("this input breaks the model")
        return original(canvases, letterboxes, expressions, **kwargs)

    monkeypatch.setattr(replica.predictor, "predict_letterboxed", poisoned)
    image = shapes_image(80, 80)
    outcomes = replica._run_batch(_queued([_item(image, "the circle"), _item(image, "poison"), _item(image, "a")]))
    assert outcomes[0].error is None and outcomes[2].error is None
    assert (outcomes[1].error.status, outcomes[1].error.code) == (500, "inference_failed")
    # Only one item failed, and the model still runs: the replica stays healthy.
    assert replica._failure is None
    asyncio.run(replica.check_health())


def test_a_broken_model_fails_the_health_check(replica, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device lost")

    monkeypatch.setattr(replica.predictor, "predict_canvas", broken)
    outcome = replica._run_batch(_queued([_item(shapes_image(40, 40), "the circle")]))[0]
    assert outcome.error.code == "inference_failed"
    assert "device lost" in replica._failure
    with pytest.raises(RuntimeError, match="model unusable"):
        asyncio.run(replica.check_health())
    monkeypatch.undo()  # the device came back: the next health check passes and clears the failure
    asyncio.run(replica.check_health())
    assert replica._failure is None


def test_user_config_changes_batching_and_threshold(replica) -> None:
    replica.reconfigure({"max_batch_size": 3, "batch_wait_timeout_s": 0.2, "mask_threshold": 0.9})
    assert replica._ground_batch._get_max_batch_size() == 3
    assert replica._ground_batch._get_batch_wait_timeout_s() == 0.2
    assert replica.info()["mask_threshold"] == 0.9
    image = shapes_image(60, 50)
    (outcome,) = replica._run_batch(_queued([_item(image, "the circle")]))
    probs = Predictor.from_pretrained(replica.identity.source).predict(image, "the circle").mask_probs
    assert outcome.threshold == 0.9 and outcome.mask_area == int((probs >= 0.9).sum())
    replica.reconfigure({})
    assert replica.info()["mask_threshold"] == 0.35
    with pytest.raises(ValueError, match="unknown"):
        replica.reconfigure({"batch_size": 4})
    with pytest.raises(ValueError, match="max_batch_size"):
        replica.reconfigure({"max_batch_size": 0})


def test_model_identity(model_dir: Path) -> None:
    predictor = Predictor.from_pretrained(model_dir)
    local = model_identity(str(model_dir), model_dir)
    assert (local.name, local.preset, local.image_size, local.max_tokens) == ("model", "tiny", 128, 40)
    assert local.vocab_size == predictor.tokenizer.vocab_size
    assert local.num_parameters == sum(p.numel() for p in predictor.model.parameters())
    assert local.weights_sha256 == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert local.version == f"sha256:{local.weights_sha256[:12]}"
    registered = model_identity("models:/vglaw-refcoco/7", model_dir)
    assert (registered.name, registered.version) == ("vglaw-refcoco", "7")
    assert model_identity("models:/vglaw-refcoco", model_dir).name == "vglaw-refcoco"


def test_mask_encodings_round_trip() -> None:
    mask = np.random.default_rng(0).random((37, 53)) > 0.6
    rle = mask_payload(mask, "rle")
    assert rle["size"] == [37, 53]
    np.testing.assert_array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    png = mask_payload(mask, "png")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(png["data"])))) > 0, mask)
    with pytest.raises(ValueError):
        mask_payload(mask, "jpeg")
