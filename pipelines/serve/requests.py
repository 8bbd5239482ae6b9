"""Request parsing and validation for the grounding endpoint, free of Ray so that it can be tested alone.

Everything a client sends is checked here, in the ingress, before any of it reaches a model replica: the
content type, the body size, the JSON or multipart structure, the base64, the image (header first, then the
full decode) and the expression. Every problem becomes an :class:`ApiError` with an HTTP status and a stable
``code`` that the JSON error body names.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats PIL may open: the common web ones. Leaving out the rest (TIFF, PSD, EPS, ...) keeps PIL's rarer
# and historically less robust decoders away from untrusted bytes.
ALLOWED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MASK_FORMATS = ("rle", "png")
# Room for the multipart framing and the other form fields on top of the image itself.
FORM_OVERHEAD_BYTES = 64 * 1024
FIELD_MAX_BYTES = 64 * 1024
GROUND_FIELDS = frozenset({"image", "expression", "return_mask", "mask_format", "threshold"})

MaskFormat = Literal["rle", "png"]
BodyKind = Literal["json", "multipart"]


class ApiError(Exception):
    """A client-facing failure: an HTTP status, a stable machine-readable code and a message.

    Args:
        status: HTTP status code (4xx for the client's mistakes, 5xx for the server's).
        code: Stable identifier, e.g. ``"empty_expression"``; clients branch on it.
        message: What is wrong, for a person.
        field: The request field at fault, when there is one.
        headers: Extra response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": {"code", "message", "field"?}}``."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


@dataclass(frozen=True)
class RequestLimits:
    """What the ingress accepts.

    Attributes:
        max_image_bytes: Largest encoded image (after base64 decoding), in bytes.
        max_image_pixels: Largest ``width * height``, read from the image header before decoding.
        max_expression_chars: Longest expression, in characters (the model reads at most 40 tokens anyway).
    """

    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_expression_chars: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels", "max_expression_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: the image as base64 (4/3 of its bytes) plus the other fields."""
        return math.ceil(self.max_image_bytes * 4 / 3) + FORM_OVERHEAD_BYTES


@dataclass(frozen=True)
class UploadedFile:
    """A file part of a multipart body, already read."""

    filename: str | None
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class GroundRequest:
    """A parsed and validated ``POST /v1/ground`` request (the image still encoded)."""

    image_bytes: bytes
    expression: str
    return_mask: bool = True
    mask_format: MaskFormat = "rle"
    threshold: float | None = None


# --------------------------------------------------------------------------------------------------
# Content type, body and auth
# --------------------------------------------------------------------------------------------------


def body_kind(content_type: str | None) -> BodyKind:
    """``"json"`` or ``"multipart"`` for a ``Content-Type`` header; anything else is a 415."""
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    if media == "application/json":
        return "json"
    if media == "multipart/form-data":
        if "boundary=" not in params.lower():
            raise ApiError(400, "malformed_multipart", "multipart/form-data without a boundary parameter")
        return "multipart"
    shown = media or "none"
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {shown} is not accepted; send multipart/form-data (image file + expression) or "
        "application/json ({'image': <base64>, 'expression': ...})",
    )


def check_content_length(header: str | None, limit: int) -> None:
    """Rejects a declared body larger than ``limit`` before reading any of it."""
    if header is None:
        return
    try:
        length = int(header)
    except ValueError:
        raise ApiError(400, "bad_content_length", f"Content-Length {header!r} is not an integer") from None
    if length > limit:
        raise ApiError(413, "request_too_large", f"request body of {length} bytes exceeds the limit of {limit}")


def authorize(header: str | None, token: str | None) -> None:
    """Checks ``Authorization: Bearer <token>`` when a token is configured (constant-time comparison).

    Raises:
        ApiError: 401 when a token is configured and the header is missing or differs.
    """
    if not token:
        return
    scheme, _, given = (header or "").partition(" ")
    # NOTE: compare_digest on bytes takes time independent of where the strings differ.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong bearer token (send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": 'Bearer realm="vglaw"'},
        )


# --------------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------------


def parse_expression(value: Any, limits: RequestLimits) -> str:
    """The expression, stripped; 422 when it is not a string, blank, or over the character limit."""
    if value is None:
        raise ApiError(422, "missing_field", "the expression is missing", field="expression")
    if not isinstance(value, str):
        raise ApiError(422, "invalid_field", "the expression must be a string", field="expression")
    text = value.strip()
    if not text:
        raise ApiError(422, "empty_expression", "the expression is empty or only whitespace", field="expression")
    if len(text) > limits.max_expression_chars:
        raise ApiError(
            422,
            "expression_too_long",
            f"the expression has {len(text)} characters; the limit is {limits.max_expression_chars}",
            field="expression",
        )
    return text


def parse_bool(value: Any, name: str, default: bool) -> bool:
    """A JSON boolean or a form string (``true/false/1/0/yes/no/on/off``)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ApiError(422, "invalid_field", f"{name} must be true or false, got {value!r}", field=name)


def parse_threshold(value: Any) -> float | None:
    """A mask probability threshold in [0, 1], or None for the model's default."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(422, "invalid_field", "threshold must be a number in [0, 1]", field="threshold")
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_field", f"threshold must be a number, got {value!r}", field="threshold") from None
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ApiError(422, "invalid_field", f"threshold must be in [0, 1], got {value!r}", field="threshold")
    return threshold


def parse_mask_format(value: Any) -> MaskFormat:
    """``"rle"`` (the default) or ``"png"``."""
    if value is None or value == "":
        return "rle"
    if not isinstance(value, str) or value.strip().lower() not in MASK_FORMATS:
        raise ApiError(422, "invalid_field", f"mask_format must be one of {list(MASK_FORMATS)}", field="mask_format")
    return value.strip().lower()  # type: ignore[return-value]


def decode_base64_image(value: Any, limits: RequestLimits) -> bytes:
    """Image bytes from a base64 string (standard alphabet; a ``data:...;base64,`` prefix is allowed)."""
    if value is None:
        raise ApiError(422, "missing_field", "the image is missing", field="image")
    if not isinstance(value, str):
        raise ApiError(422, "invalid_field", "image must be a base64 string", field="image")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    text = "".join(text.split())  # line-wrapped base64 (76 columns, as MIME writes it) is fine
    if len(text) * 3 // 4 > limits.max_image_bytes + 2:
        raise ApiError(
            413, "image_too_large", f"the image exceeds the limit of {limits.max_image_bytes} bytes", field="image"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", "image is not valid base64", field="image") from None


def _ground_request(fields: Mapping[str, Any], image_bytes: bytes, limits: RequestLimits) -> GroundRequest:
    return GroundRequest(
        image_bytes=image_bytes,
        expression=parse_expression(fields.get("expression"), limits),
        return_mask=parse_bool(fields.get("return_mask"), "return_mask", default=True),
        mask_format=parse_mask_format(fields.get("mask_format")),
        threshold=parse_threshold(fields.get("threshold")),
    )


def _reject_unknown(names: Sequence[str]) -> None:
    unknown = sorted(set(names) - GROUND_FIELDS)
    if unknown:
        raise ApiError(
            422, "unknown_field", f"unknown fields {unknown}; accepted: {sorted(GROUND_FIELDS)}", field=unknown[0]
        )


def parse_json_request(body: bytes, limits: RequestLimits) -> GroundRequest:
    """A ``POST /v1/ground`` JSON body: ``{"image": <base64>, "expression": str, ...options}``."""
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "malformed_json", f"the body must be a JSON object, got {type(payload).__name__}")
    _reject_unknown(list(payload))
    image_bytes = decode_base64_image(payload.get("image"), limits)
    return _ground_request(payload, image_bytes, limits)


def parse_form_request(fields: Mapping[str, Sequence[str | UploadedFile]], limits: RequestLimits) -> GroundRequest:
    """A ``POST /v1/ground`` multipart body: an ``image`` file part, an ``expression`` text part, options.

    Args:
        fields: Every part by name, in order (a name sent twice is a 422).
        limits: The limits to enforce.
    """
    _reject_unknown(list(fields))
    values: dict[str, str | UploadedFile] = {}
    for name, parts in fields.items():
        if len(parts) != 1:
            raise ApiError(422, "duplicate_field", f"{name} was sent {len(parts)} times", field=name)
        values[name] = parts[0]
    image = values.get("image")
    if image is None:
        raise ApiError(422, "missing_field", "the image file part is missing", field="image")
    if not isinstance(image, UploadedFile):
        raise ApiError(422, "invalid_field", "image must be a file part (filename=...)", field="image")
    for name, value in values.items():
        if name != "image" and isinstance(value, UploadedFile):
            raise ApiError(422, "invalid_field", f"{name} must be a text field, not a file", field=name)
    return _ground_request(values, image.data, limits)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def open_image(data: bytes, limits: RequestLimits) -> Image.Image:
    """Decodes untrusted image bytes, checking size and pixel count before the pixels are decompressed.

    The returned image is fully loaded, in its displayed orientation (EXIF orientation applied), in its
    original mode (transparency is handled by the letterbox).

    Raises:
        ApiError: 400 for empty, unreadable or truncated data, 413 over the byte or pixel limits.
    """
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)", field="image")
    if len(data) > limits.max_image_bytes:
        raise ApiError(
            413,
            "image_too_large",
            f"the image has {len(data)} bytes; the limit is {limits.max_image_bytes}",
            field="image",
        )
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; our own limit is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
        except Image.DecompressionBombError as err:
            message = f"the image header declares too many pixels ({err})"
            raise ApiError(413, "too_many_pixels", message, field="image") from None
        except UnidentifiedImageError:
            raise ApiError(
                400,
                "invalid_image",
                f"the data is not an image in a supported format ({', '.join(ALLOWED_IMAGE_FORMATS)})",
                field="image",
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _unreadable(err, "the image header cannot be read") from None
        # Image.open reads only the header: the pixel check happens before any decompression.
        width, height = image.size
        if width < 1 or height < 1:
            raise ApiError(400, "invalid_image", f"the image is {width}x{height}", field="image")
        if width * height > limits.max_image_pixels:
            raise ApiError(
                413,
                "too_many_pixels",
                f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels} "
                "(checked from the header, before decoding)",
                field="image",
            )
        try:
            image.load()
            return ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _unreadable(err, "the image cannot be decoded") from None


def _unreadable(err: Exception, what: str) -> ApiError:
    """A 400 for a decoder error: ``truncated_image`` when the data ends early, else ``invalid_image``."""
    text = str(err) or type(err).__name__
    truncated = "truncated" in text.lower() or isinstance(err, EOFError)
    return ApiError(400, "truncated_image" if truncated else "invalid_image", f"{what}: {text}", field="image")
