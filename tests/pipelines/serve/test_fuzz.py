"""Fuzzing the request parser: whatever a client sends, parsing either yields a request the model can take or
raises an :class:`ApiError` with a documented 4xx code, never another exception (which would be a 500)."""

from __future__ import annotations

import base64
import json
import math
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.serve.errors import ERROR_CODES, ApiError
from pipelines.serve.images import open_image
from pipelines.serve.requests import (
    GROUND_FIELDS,
    MASK_FORMATS,
    GroundRequest,
    RequestLimits,
    UploadedFile,
    decode_base64_image,
    parse_bool,
    parse_expression,
    parse_form_request,
    parse_json_request,
    parse_mask_format,
    parse_multipart_request,
    parse_threshold,
)
from tests.pipelines.serve_harness import encode, shapes_image

LIMITS = RequestLimits(max_image_bytes=20_000, max_image_pixels=250_000, max_expression_chars=50)
PNG = encode(shapes_image(24, 16))
JPEG = encode(shapes_image(24, 16), "JPEG")
# NOTE: no example database (nothing written into the repository); a failure prints its example to reproduce.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Every code point, lone surrogates included (Hypothesis leaves them out of text() by default), and text made of
# the characters that need care (surrogates, invisible ones, a control character) next to a visible one.
any_text = st.text(st.characters(codec=None, categories=None), max_size=20) | st.text(
    st.sampled_from("\ud800\udfff\u200b\ufeff\u3164\x00 a"), min_size=1, max_size=6
)
field_name = st.sampled_from(sorted(GROUND_FIELDS)) | any_text
field_text = (
    st.sampled_from(["", " ", "true", "no", "0.5", "1e-1", "png", "RLE", "the red circle", "\u200b"]) | any_text
)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_value = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4), max_leaves=8
)
image_text = st.sampled_from(
    [
        base64.b64encode(PNG).decode(),
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "data:image/png;base64",
        "data:,",
        "",
    ]
) | st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())


def check(parse: Any, *args: Any) -> Any:
    """Runs ``parse``; the only exception allowed is a documented 4xx ApiError whose body encodes as JSON."""
    try:
        result = parse(*args)
    except ApiError as err:
        assert 400 <= err.status < 500, err.body()
        assert ERROR_CODES[err.code].status in (str(err.status), "4xx"), err.body()
        json.dumps(err.body(), ensure_ascii=False, allow_nan=False).encode("utf-8")  # what JSONResponse does
        return None
    if isinstance(result, GroundRequest):
        check_ground_request(result)
    return result


def check_expression(expression: str) -> None:
    """Valid text (no lone surrogates), stripped, within the limit, with a character that shows."""
    expression.encode("utf-8")
    assert expression.strip() == expression and len(expression) <= LIMITS.max_expression_chars
    # Unassigned code points (Cn) count as visible: this Python's Unicode tables may predate the client's.
    shows = [unicodedata.category(char) not in ("Zs", "Zl", "Zp", "Cc", "Cf", "Cs") for char in expression]
    assert any(shows), ascii(expression)


def check_ground_request(request: GroundRequest) -> None:
    """What the model replica relies on."""
    check_expression(request.expression)
    assert isinstance(request.return_mask, bool) and request.mask_format in MASK_FORMATS
    assert request.threshold is None or (isinstance(request.threshold, float) and 0 <= request.threshold <= 1)
    assert isinstance(request.image_bytes, bytes)


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "fuzz-b0undary-7f3a") -> bytes:
    chunks = []
    for name, data, filename in parts:
        quoted = name.encode("utf-8", "surrogatepass").replace(b'"', b"%22").replace(b"\r", b"").replace(b"\n", b"")
        disposition = b'form-data; name="' + quoted + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename.encode("utf-8", "replace").replace(b'"', b"") + b'"'
        chunks.append(b"--" + boundary.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data)
        chunks.append(b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


MULTIPART_TYPE = "multipart/form-data; boundary=fuzz-b0undary-7f3a"


@FUZZ
@given(document=st.dictionaries(field_name, json_value | image_text, max_size=7), raw=json_value)
def test_random_json_documents(document: dict[str, Any], raw: Any) -> None:
    for value in (document, raw):
        body = json.dumps(value).encode()  # NaN and Infinity as Python writes them; surrogates as \\udXXX
        check(parse_json_request, body, LIMITS)


@FUZZ
@given(
    image=image_text,
    expression=any_text | st.sampled_from(["the circle", " a ", "\u200b\u2060", "\ud800", "a" * 60]),
    options=st.dictionaries(st.sampled_from(["return_mask", "mask_format", "threshold"]), json_value, max_size=3),
    duplicate=st.booleans(),
)
def test_json_requests_near_valid(image: str, expression: str, options: dict[str, Any], duplicate: bool) -> None:
    body = json.dumps({"image": image, "expression": expression, **options})
    if duplicate:
        body = body[:-1] + ', "expression": "again"}'
    check(parse_json_request, body.encode(), LIMITS)


@FUZZ
@given(data=st.binary(max_size=200), cut=st.integers(0, 400), insert=st.binary(max_size=8))
def test_random_and_mutated_bytes(data: bytes, cut: int, insert: bytes) -> None:
    valid_json = json.dumps({"image": base64.b64encode(PNG).decode(), "expression": "the circle"}).encode()
    valid_form = multipart([("image", PNG, "x.png"), ("expression", b"the circle", None)])
    check(parse_json_request, data, LIMITS)
    check(parse_multipart_request, data, MULTIPART_TYPE, LIMITS)
    check(parse_json_request, valid_json[:cut] + insert + valid_json[cut:], LIMITS)
    at = cut * len(valid_form) // 400
    check(parse_multipart_request, valid_form[:at] + insert + valid_form[at + len(insert) :], MULTIPART_TYPE, LIMITS)


@FUZZ
@given(
    parts=st.lists(
        st.tuples(
            field_name,
            st.binary(max_size=30) | field_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
            st.none() | st.just("x.png"),
        ),
        max_size=8,
    ),
    content_type=st.sampled_from([MULTIPART_TYPE, "multipart/form-data", "multipart/form-data; boundary="]),
)
def test_random_multipart_field_sets(parts: list[tuple[str, bytes, str | None]], content_type: str) -> None:
    check(parse_multipart_request, multipart(parts), content_type, LIMITS)
    image = [("image", PNG, "x.png")]
    check(parse_multipart_request, multipart(image + parts), MULTIPART_TYPE, LIMITS)


@FUZZ
@given(
    fields=st.dictionaries(
        field_name,
        st.lists(
            field_text | st.binary(max_size=20) | st.builds(UploadedFile, st.none(), st.none(), st.binary(max_size=20)),
            min_size=1,
            max_size=2,
        ),
        max_size=6,
    )
)
def test_random_form_fields(fields: dict[str, list[Any]]) -> None:
    check(parse_form_request, fields, LIMITS)
    check(parse_form_request, {"image": [UploadedFile("x.png", None, PNG)], **fields}, LIMITS)


@FUZZ
@given(value=field_text | any_text | json_value | image_text | st.binary(max_size=20))
def test_random_field_values(value: Any) -> None:
    expression = check(parse_expression, value, LIMITS)
    if expression is not None:
        check_expression(expression)
    check(parse_bool, value, "return_mask", True)
    check(parse_mask_format, value)
    threshold = check(parse_threshold, value)
    assert threshold is None or (0 <= threshold <= 1 and not math.isnan(threshold))
    check(decode_base64_image, value, LIMITS)


@pytest.mark.parametrize("image", [PNG, JPEG], ids=["png", "jpeg"])
def test_mutated_images(image: bytes) -> None:
    @FUZZ
    @given(at=st.integers(0, len(image)), insert=st.binary(min_size=1, max_size=4), cut=st.integers(0, 64))
    def mutated(at: int, insert: bytes, cut: int) -> None:
        check(open_image, image[:at] + insert + image[at + cut :], LIMITS)

    mutated()
