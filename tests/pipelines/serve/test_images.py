"""High-bit-depth and odd-mode images through every entry point: Serve's ingress, the MLflow pyfunc's decoding and
preprocessing's opening give the pixels of :func:`vglaw.images.to_rgb8`; a 16-bit PNG sent to a running endpoint
gets the box of its 8-bit reference."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pipelines.serve.app import prepare_item
from pipelines.serve.images import open_image
from pipelines.serve.requests import RequestLimits, UploadedFile, parse_form_request
from tests.pipelines.serve_harness import encode, running_app, save_tiny_model
from tests.vglaw.test_images import picture16
from vglaw import Predictor
from vglaw.geometry import Letterbox
from vglaw.images import to_rgb8

LIMITS = RequestLimits()
EXPRESSION = "the small red circle"


def png16_rgba(samples: np.ndarray) -> bytes:
    """A 16-bit RGBA PNG written byte by byte (PIL cannot write one): ``samples`` uint16 [H, W, 4]."""
    height, width = samples.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def encoded_images() -> dict[str, bytes]:
    """Files of the modes a client may send, each in a format the ingress accepts."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    palette = Image.frombytes("P", (40, 30), rng.integers(0, 256, (30, 40), dtype=np.uint8).tobytes())
    palette.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    transparent = io.BytesIO()
    palette.save(transparent, format="PNG", transparency=rng.integers(0, 256, 256, dtype=np.uint8).tobytes())
    return {
        "I;16 png": encode(Image.fromarray(picture16(30, 40))),
        "RGBA 16-bit png": png16_rgba(rng.integers(0, 65536, (30, 40, 4), dtype=np.uint16)),
        "RGBA png": encode(Image.fromarray(rgba)),
        "LA png": encode(Image.fromarray(rgba[..., [0, 3]])),
        "P png": encode(palette),
        "P transparent png": transparent.getvalue(),
        "1 png": encode(Image.fromarray(rgba[..., 0] > 127)),
        "L png": encode(Image.fromarray(rgba[..., 0])),
        "CMYK jpeg": encode(Image.frombytes("CMYK", (40, 30), rgba.tobytes()), "JPEG"),
        "P gif": encode(palette, "GIF"),
    }


@pytest.mark.parametrize("name", list(encoded_images()))
def test_every_entry_point_decodes_to_the_shared_conversion(name: str, tmp_path: Path) -> None:
    from pipelines.data.encode import open_rgb_ready
    from pipelines.tracking.pyfunc import decode_image_input

    data = encoded_images()[name]
    expected = np.asarray(to_rgb8(Image.open(io.BytesIO(data))))  # [H, W, 3]
    assert expected.dtype == np.uint8
    if name.startswith("I;16"):
        np.testing.assert_array_equal(expected[..., 0], picture16(30, 40) >> 8)
    np.testing.assert_array_equal(np.asarray(open_image(data, LIMITS)), expected)
    np.testing.assert_array_equal(np.asarray(decode_image_input(data)), expected)
    path = tmp_path / "image"
    path.write_bytes(data)
    np.testing.assert_array_equal(np.asarray(open_rgb_ready(path)), expected)

    # The ingress's canvas is the Predictor's canvas.
    request = parse_form_request({"image": [UploadedFile("x", None, data)], "expression": ["x"]}, LIMITS)
    item, width, height = prepare_item(request, LIMITS, image_size=64)
    fit = Letterbox.fit(width, height, 64)
    np.testing.assert_array_equal(item.canvas, np.asarray(fit.image(Image.open(io.BytesIO(data)))))


# ---- a running endpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve-images") / "model")


@pytest.fixture(scope="module")
def url(model_dir: Path) -> Iterator[str]:
    with running_app({"model": str(model_dir)}) as base:
        yield base


def box(url: str, data: bytes) -> np.ndarray:
    files = {"image": ("x.png", data)}
    response = requests.post(f"{url}/v1/ground", files=files, data={"expression": EXPRESSION, "return_mask": "false"})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["box"])


@pytest.mark.slow
def test_16_bit_png_gets_the_box_of_its_8_bit_reference(url: str, model_dir: Path) -> None:
    a = picture16()
    png16 = encode(Image.fromarray(a))
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    reference = np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2)  # the 8-bit picture, in numpy
    expected = box(url, encode(Image.fromarray(reference)))
    assert np.abs(box(url, png16) - expected).max() <= 1.0
    predictor = Predictor.from_pretrained(model_dir)
    assert np.abs(np.asarray(predictor.predict(reference, EXPRESSION).box) - expected).max() <= 1.0
    # NOTE: what the ingress made of the 16-bit PNG before (PIL's clipping convert: nearly white) is answered
    # with another box, so this test catches the bug.
    clipped = encode(Image.open(io.BytesIO(png16)).convert("RGB"))
    assert np.abs(box(url, clipped) - expected).max() > 1.0
