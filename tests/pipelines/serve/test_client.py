"""The Python client (:mod:`pipelines.serve.client`): its RLE decoding against pycocotools, its error mapping, and
answers from a live endpoint equal to :class:`vglaw.Predictor`'s for every kind of image input.

The fast tests need no Serve; the slow ones share one application (tiny model, a token) for the module.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.serve.client import (
    AuthError,
    GroundingClient,
    GroundingError,
    GroundingResult,
    OverloadedError,
    encode_image,
    error_from_response,
)
from pipelines.serve.errors import ERROR_CODES
from tests.pipelines.serve_harness import EXPRESSIONS, encode, free_port, running_app, save_tiny_model, shapes_image
from vglaw import Predictor

TOKEN = "client-test-token"


# --------------------------------------------------------------------------------------------------
# Without Serve: decoding a response, mapping errors, encoding images
# --------------------------------------------------------------------------------------------------


def response_body(true_mask: np.ndarray, **fields: Any) -> dict[str, Any]:
    """A ``200`` body of ``POST /v1/ground`` whose mask pycocotools encoded (the independent reference)."""
    height, width = true_mask.shape
    rle = mask_utils.encode(np.asfortranarray(true_mask.astype(np.uint8)))
    return {
        "box": [3.0, 4.5, 20.25, 30.0],
        "box_normalized": [3.0 / width, 4.5 / height, 20.25 / width, 30.0 / height],
        "image": {"width": width, "height": height},
        "expression": "the blob",
        "truncated": False,
        "mask": {"format": "rle", "size": [height, width], "counts": rle["counts"].decode("ascii"), "data": None},
        "mask_area": int(true_mask.sum()),
        "threshold": 0.35,
        "model": {"name": "vglaw-test", "version": "1"},
        "timings": {"total_ms": 1.0},
        **fields,
    }


def test_the_response_mask_decodes_to_the_mask_pycocotools_encoded() -> None:
    rng = np.random.default_rng(0)
    # Not square, so that a row-major reading of COCO's column-major runs cannot pass.
    mask = np.zeros((37, 53), dtype=bool)
    mask[5:20, 8:40] = True
    mask[25:, :10] = rng.random((12, 10)) > 0.5
    body = response_body(mask)
    result = GroundingResult.from_response(body)
    assert result.mask is not None and result.mask.dtype == bool and result.mask.shape == (37, 53)
    np.testing.assert_array_equal(result.mask, mask)
    assert result.mask_area == int(mask.sum())
    assert result.box == (3.0, 4.5, 20.25, 30.0) and (result.width, result.height) == (53, 37)
    assert result.raw is body and result.model == {"name": "vglaw-test", "version": "1"}


def test_a_response_without_mask_has_none() -> None:
    result = GroundingResult.from_response(response_body(np.zeros((4, 5), bool), mask=None, mask_area=None))
    assert result.mask is None and result.mask_area is None


def test_a_body_that_is_not_a_grounding_is_an_unexpected_response() -> None:
    with pytest.raises(GroundingError) as caught:
        GroundingResult.from_response({"status": "ok"})
    assert caught.value.code == "unexpected_response"


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "code", "retry_after"),
    [
        (422, b'{"error": {"code": "empty_expression", "message": "empty", "field": "expression"}}', {}, GroundingError,
         "empty_expression", None),
        (401, b'{"error": {"code": "unauthorized", "message": "token"}}', {}, AuthError, "unauthorized", None),
        (503, b'{"error": {"code": "overloaded", "message": "busy"}}', {"Retry-After": "2"}, OverloadedError,
         "overloaded", 2.0),
        (503, b'{"error": {"code": "model_unavailable", "message": "gone"}}', {"Retry-After": "3"}, OverloadedError,
         "model_unavailable", 3.0),
        # Ray's proxy answers a full ingress queue in plain text.
        (503, b"Request dropped due to backpressure", {"Retry-After": "2"}, OverloadedError, "http_error", 2.0),
        (504, b'{"error": {"code": "request_timeout", "message": "late"}}', {}, GroundingError, "request_timeout",
         None),
        (500, b"<html>oops</html>", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, GroundingError, "http_error",
         None),
    ],
)  # fmt: skip
def test_error_answers_map_to_their_exception(
    status: int, body: bytes, headers: dict[str, str], kind: type, code: str, retry_after: float | None
) -> None:
    response = requests.Response()
    response.status_code, response._content = status, body
    response.headers.update(headers)
    with pytest.raises(GroundingError) as caught:
        GroundingClient._json(response)
    error = caught.value
    assert type(error) is kind
    assert (error.status, error.code, error.retry_after) == (status, code, retry_after)
    assert error.message and code in str(error)
    assert error_from_response(status, response.headers, body).code == code


def test_a_refused_connection_is_a_connection_error() -> None:
    with (
        GroundingClient(f"http://127.0.0.1:{free_port()}", timeout=5) as client,
        pytest.raises(GroundingError) as caught,
    ):
        client.health()
    assert (caught.value.status, caught.value.code) == (None, "connection_error")
    assert "cannot reach" in caught.value.message


def test_a_server_that_never_answers_is_a_timeout() -> None:
    with socket.socket() as server:  # listens (the kernel completes the handshake) but never reads or answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with GroundingClient(url, timeout=0.5) as client, pytest.raises(GroundingError) as caught:
            client.model_info()
    assert (caught.value.status, caught.value.code) == (None, "timeout")


def test_every_image_input_uploads_the_same_pixels(tmp_path: Path) -> None:
    image = shapes_image(40, 30, seed=1)
    path = tmp_path / "shapes.png"
    image.save(path)
    uploads = [encode_image(x)[1] for x in (path, str(path), path.read_bytes(), image, np.asarray(image))]
    for data in uploads:
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(io.BytesIO(data))))
    with pytest.raises(TypeError, match="image must be"):
        encode_image([[0, 0, 0]])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Against a live endpoint
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("client") / "model")


@pytest.fixture(scope="module")
def url(model_dir: Path) -> Iterator[str]:
    """One Serve application for the module's live tests, with a token."""
    with running_app({"model": str(model_dir), "auth_token": TOKEN}) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[GroundingClient]:
    with GroundingClient(url, token=TOKEN) as grounding_client:
        yield grounding_client


def assert_same_as_predictor(result: GroundingResult, predictor: Predictor, image: Image.Image, expression: str,
                             threshold: float | None = None) -> None:  # fmt: skip
    expected = predictor.predict(image, expression, threshold=threshold)
    threshold = predictor.mask_threshold if threshold is None else threshold
    np.testing.assert_allclose(result.box, expected.box, atol=1e-3)
    assert result.mask is not None and result.mask.shape == expected.mask.shape == (image.height, image.width)
    # NOTE: the replica runs torch with another thread count than this process; float sums may differ in the
    # last bits, which can only flip pixels whose probability is within rounding of the threshold.
    undecided = np.abs(expected.mask_probs - threshold) < 1e-4
    np.testing.assert_array_equal(result.mask[~undecided], expected.mask[~undecided])
    assert result.mask_area == int(result.mask.sum())
    assert result.threshold == pytest.approx(threshold)


@pytest.mark.slow
def test_answers_equal_the_predictor(client: GroundingClient, model_dir: Path) -> None:
    predictor = Predictor.from_pretrained(model_dir)
    cases = [
        (shapes_image(120, 90, seed=3), EXPRESSIONS[0], None),
        (shapes_image(64, 100, seed=5), EXPRESSIONS[2], 0.5),
    ]
    for image, expression, threshold in cases:
        result = client.ground(image, expression, threshold=threshold)
        assert_same_as_predictor(result, predictor, image, expression, threshold)
        assert (result.width, result.height) == image.size and result.expression == expression
        assert result.raw["mask"]["format"] == "rle"


@pytest.mark.slow
def test_a_path_bytes_a_pil_image_and_an_array_give_the_same_answer(client: GroundingClient, tmp_path: Path) -> None:
    image = shapes_image(96, 72, seed=7)
    path = tmp_path / "shapes.png"
    path.write_bytes(encode(image))
    results = [client.ground(x, EXPRESSIONS[1]) for x in (path, path.read_bytes(), image, np.asarray(image))]
    for result in results[1:]:
        np.testing.assert_allclose(result.box, results[0].box, atol=1e-5)
        np.testing.assert_array_equal(result.mask, results[0].mask)


@pytest.mark.slow
def test_a_wrong_or_missing_token_raises_auth_error(url: str) -> None:
    png = encode(shapes_image(32, 32))
    for token in ("wrong-token", None):
        with GroundingClient(url, token=token) as client:
            with pytest.raises(AuthError) as caught:
                client.ground(png, "the circle")
            assert (caught.value.status, caught.value.code) == (401, "unauthorized")
            with pytest.raises(AuthError):
                client.model_info()
            assert client.health()["status"] == "ok"  # open without a token


@pytest.mark.slow
@pytest.mark.parametrize(
    ("expression", "threshold", "code"),
    [(" \u200b ", None, "empty_expression"), ("the circle", 1.5, "invalid_field")],
)
def test_a_refused_request_raises_the_servers_code(
    client: GroundingClient, expression: str, threshold: float | None, code: str
) -> None:
    with pytest.raises(GroundingError) as caught:
        client.ground(encode(shapes_image(32, 32)), expression, threshold=threshold)
    error = caught.value
    assert type(error) is GroundingError
    assert error.code == code and str(error.status) == ERROR_CODES[code].status and error.message


@pytest.mark.slow
def test_model_info_and_health(client: GroundingClient) -> None:
    info = client.model_info()
    assert info["auth"] is True and info["model"]["preset"] == "tiny" and info["stats"]["requests"] >= 0
    health = client.health()
    assert health["status"] == "ok" and health["model"]["name"] == info["model"]["name"]
