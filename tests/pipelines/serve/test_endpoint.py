"""The grounding application on a real Serve instance, queried over HTTP: equality with the Predictor, every
bad input, concurrency with batching, auth, and the model replica's isolation of bad items."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.serve.model import MODEL_DEPLOYMENT, GroundingItem
from tests.pipelines.serve_harness import APP_NAME, encode, running_app, save_tiny_model, shapes_image
from vglaw import Grounding, Predictor
from vglaw.geometry import Letterbox

pytestmark = pytest.mark.slow

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_image_bytes": 1_000_000, "max_image_pixels": 1_000_000, "max_expression_chars": 200}
PNG = encode(shapes_image(120, 90, seed=3))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def url(model_dir: Path) -> Iterator[str]:
    """One Serve application for the module: auth on, small limits, a 50 ms batch window."""
    args = {"model": str(model_dir), "auth_token": TOKEN, "batch_wait_timeout_s": 0.05, **LIMITS}
    with running_app(args) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers.update(AUTH)
        yield session


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor.from_pretrained(model_dir)


def ground(client: requests.Session, url: str, image: bytes, expression: str, **options: Any) -> requests.Response:
    return client.post(f"{url}/v1/ground", files={"image": ("x", image)}, data={"expression": expression, **options})


def assert_same_grounding(body: dict[str, Any], expected: Grounding, threshold: float = 0.35) -> None:
    """Box equal to float precision; mask equal except where the probability sits on the threshold."""
    np.testing.assert_allclose(body["box"], expected.box, atol=1e-3)
    np.testing.assert_allclose(body["box_normalized"], expected.box_normalized, atol=1e-5)
    mask = body["mask"]
    if mask["format"] == "rle":
        decoded = mask_utils.decode({"size": mask["size"], "counts": mask["counts"].encode()}).astype(bool)
    else:
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["data"])))) > 0
    assert decoded.shape == expected.mask.shape
    # NOTE: the replica runs torch with another thread count than this process; float sums may differ in the
    # last bits, which can only flip pixels whose probability is within rounding of the threshold.
    undecided = np.abs(expected.mask_probs - threshold) < 1e-4
    np.testing.assert_array_equal(decoded[~undecided], expected.mask[~undecided])
    assert body["mask_area"] == int(decoded.sum())


def test_answers_equal_the_predictor(client: requests.Session, url: str, predictor: Predictor) -> None:
    cases = [
        (encode(shapes_image(120, 90, seed=1)), "the small red circle"),
        (encode(shapes_image(64, 200, seed=2, mode="RGBA")), "the blue square on the left"),
        (encode(shapes_image(300, 140, seed=3), "JPEG"), "a big green triangle on the right"),
    ]
    for data, expression in cases:
        expected = predictor.predict(Image.open(io.BytesIO(data)), expression)
        response = ground(client, url, data, expression)
        assert response.status_code == 200, response.text
        body = response.json()
        assert_same_grounding(body, expected)
        width, height = Image.open(io.BytesIO(data)).size
        assert body["image"] == {"width": width, "height": height} and body["mask"]["size"] == [height, width]
        assert body["truncated"] is False and body["expression"] == expression
        assert all(v >= 0 for v in body["timings"].values()) and body["timings"]["batch_size"] >= 1

        as_json = {"image": base64.b64encode(data).decode(), "expression": f"  {expression}\n", "mask_format": "png"}
        response = client.post(f"{url}/v1/ground", json=as_json)
        assert response.status_code == 200, response.text
        assert response.json()["mask"]["format"] == "png"
        assert_same_grounding(response.json(), expected)

    data, expression = cases[0]
    image = Image.open(io.BytesIO(data))
    body = ground(client, url, data, expression, threshold="0.6").json()
    assert body["threshold"] == 0.6
    assert_same_grounding(body, predictor.predict(image, expression, threshold=0.6), threshold=0.6)
    body = ground(client, url, data, expression, return_mask="false").json()
    assert body["mask"] is None and body["mask_area"] is None
    np.testing.assert_allclose(body["box"], predictor.predict(image, expression).box, atol=1e-3)
    long = "red " * 48  # 48 words, 192 characters: within the character limit, over the 40 tokens
    body = ground(client, url, data, long).json()
    assert body["truncated"] is True and predictor.predict(image, long).truncated


def test_model_info_and_health(client: requests.Session, url: str, model_dir: Path) -> None:
    info = client.get(f"{url}/v1/model").json()
    assert info["model"]["preset"] == "tiny" and info["model"]["image_size"] == 128
    assert info["model"]["source"] == model_dir.name and info["auth"] is True  # no server path
    assert info["limits"] == LIMITS and info["model"]["batching"]["batch_wait_timeout_s"] == 0.05
    body = ground(client, url, PNG, "the circle").json()
    assert body["model"] == {"name": info["model"]["name"], "version": info["model"]["version"]}
    assert requests.get(f"{url}/healthz").json() == {"status": "ok", "model": body["model"]}
    schema = requests.get(f"{url}/openapi.json").json()
    assert {"/v1/ground", "/v1/model", "/healthz"} <= set(schema["paths"])
    assert set(schema["paths"]["/v1/ground"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/json",
    }


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit PNG of ``width x height`` zeros: about 110 KB that would decode to ~900 megapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _multipart(image: bytes, expression: str = "the circle", **fields: Any) -> dict[str, Any]:
    return {"files": {"image": ("x", image)}, "data": {"expression": expression, **fields}}


JSON = {"Content-Type": "application/json"}
MULTIPART_B = {"Content-Type": "multipart/form-data; boundary=b"}
# name: (keyword arguments of requests.post, expected status, expected error code)
BAD_REQUESTS: dict[str, tuple[dict[str, Any], int, str]] = {
    "non-image bytes": (_multipart(b"this is not an image, just text"), 400, "invalid_image"),
    "truncated png": (_multipart(PNG[: len(PNG) // 2]), 400, "truncated_image"),
    "zero-byte upload": (_multipart(b""), 400, "empty_image"),
    "decompression bomb": (_multipart(png_bomb()), 413, "too_many_pixels"),
    "over the pixel limit": (_multipart(encode(Image.new("L", (1001, 1000)))), 413, "too_many_pixels"),
    "over the byte limit": (_multipart(PNG + bytes(1_000_000)), 413, "image_too_large"),
    "body over the limit": ({"data": b"x" * 2_000_000, "headers": JSON}, 413, "request_too_large"),
    "empty expression": (_multipart(PNG, ""), 422, "empty_expression"),
    "whitespace expression": (_multipart(PNG, " \t\n "), 422, "empty_expression"),
    "expression too long": (_multipart(PNG, "a" * 201), 422, "expression_too_long"),
    "text/plain": ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    "no content type": ({"data": b""}, 415, "unsupported_media_type"),
    "url-encoded form": ({"data": {"expression": "x"}}, 415, "unsupported_media_type"),
    "malformed json": ({"data": b'{"image": "abc', "headers": JSON}, 400, "malformed_json"),
    "json not an object": ({"json": ["image", "expression"]}, 400, "malformed_json"),
    "bad base64": ({"json": {"image": "@@not base64@@", "expression": "x"}}, 400, "invalid_base64"),
    "json without image": ({"json": {"expression": "x"}}, 422, "missing_field"),
    "json without expression": ({"json": {"image": base64.b64encode(PNG).decode()}}, 422, "missing_field"),
    "multipart without image": ({"files": {"expression": (None, "x")}}, 422, "missing_field"),
    "multipart without expression": ({"files": {"image": ("x", PNG)}}, 422, "missing_field"),
    "unknown field": (_multipart(PNG, expresion="typo"), 422, "unknown_field"),
    "threshold out of range": (_multipart(PNG, threshold="1.5"), 422, "invalid_field"),
    "bad mask format": (_multipart(PNG, mask_format="jpeg"), 422, "invalid_field"),
    "multipart without boundary": (
        {"data": b"--b\r\n", "headers": {"Content-Type": "multipart/form-data"}},
        400,
        "malformed_multipart",
    ),
    "broken multipart": (
        {"data": b"--b\r\nContent-Disposition: form-data\r\n\r\nx", "headers": MULTIPART_B},
        400,
        "malformed_multipart",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_a_named_4xx_and_the_server_lives_on(client: requests.Session, url: str, case: str) -> None:
    kwargs, status, code = BAD_REQUESTS[case]
    start = time.perf_counter()
    response = client.post(f"{url}/v1/ground", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if case == "decompression bomb":
        assert time.perf_counter() - start < 5, "the bomb was rejected from its header, not decoded"
    good = ground(client, url, PNG, "the small red circle")
    assert good.status_code == 200, good.text


def test_wrong_method_and_path_are_json(client: requests.Session, url: str) -> None:
    response = client.get(f"{url}/v1/ground")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    response = client.get(f"{url}/v2/ground")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_auth(url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = requests.post(f"{url}/v1/ground", headers=headers, **_multipart(PNG))
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert requests.get(f"{url}/v1/model", headers=headers).status_code == 401
    response = requests.post(f"{url}/v1/ground", headers=AUTH, **_multipart(PNG))
    assert response.status_code == 200
    # The page and the health check stay open, so that a person can load the page and type the token.
    assert requests.get(f"{url}/healthz").status_code == 200
    page = requests.get(f"{url}/")
    assert page.status_code == 200 and "<canvas" in page.text and "token" in page.text


def test_concurrent_clients_are_batched_without_errors(client: requests.Session, url: str) -> None:
    num_clients, duration_s = 8, 5.0
    images = [encode(shapes_image(40 + 20 * i, 120 - 10 * i, seed=i)) for i in range(num_clients)]
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def hammer(index: int) -> None:
        with requests.Session() as session:
            session.headers.update(AUTH)
            deadline = time.monotonic() + duration_s
            while time.monotonic() < deadline:
                response = ground(session, url, images[index], "the small red circle", mask_format="rle")
                size = response.json()["timings"]["batch_size"] if response.status_code == 200 else 0
                with lock:
                    results.append((response.status_code, size))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(num_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration_s + 60)
    assert not any(thread.is_alive() for thread in threads)
    statuses = [status for status, _ in results]
    assert len(results) >= num_clients and statuses.count(200) == len(results), set(statuses)
    assert max(size for _, size in results) > 1
    stats = client.get(f"{url}/v1/model").json()["stats"]
    assert stats["max_batch_size_seen"] > 1 and stats["healthy"] is True


def test_model_replica_answers_good_items_of_a_batch_with_bad_ones(client: requests.Session, url: str) -> None:
    from ray import serve

    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP_NAME)
    image = shapes_image(100, 70)
    fit = Letterbox.fit(100, 70, 128)
    good = GroundingItem(np.asarray(fit.image(image)), fit, "the small red circle")
    handle.info.remote().result(timeout_s=60)  # the handle knows the replica before the burst
    items = [good, GroundingItem(np.zeros((9, 9, 3), np.uint8), fit, "x"), "junk", good]
    outcomes = [response.result(timeout_s=60) for response in [handle.ground.remote(item) for item in items]]
    assert outcomes[0].error is None and outcomes[3].error is None
    assert outcomes[1].error.code == "invalid_item" and outcomes[2].error.code == "invalid_item"
    assert max(outcome.batch_size for outcome in outcomes) > 1
    assert ground(client, url, PNG, "the small red circle").status_code == 200
    assert requests.get(f"{url}/healthz").status_code == 200
