"""Request parsing and validation for the grounding endpoint, free of Ray so that it can be tested alone.

Everything a client sends is checked here, in the ingress, before any of it reaches a model replica: the
content type, the body size, the JSON or multipart structure, the base64, the image (header first, then the
full decode) and the expression. Every problem becomes an :class:`~pipelines.serve.errors.ApiError` with an
HTTP status and a stable ``code`` that the JSON error body names.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from pipelines.serve.errors import JSON_MAX_INT_DIGITS, ApiError

MASK_FORMATS = ("rle", "png")
# Room for the multipart framing and the other form fields on top of the image itself.
FORM_OVERHEAD_BYTES = 64 * 1024
GROUND_FIELDS = frozenset({"image", "expression", "return_mask", "mask_format", "threshold"})
# RFC 2046 caps a multipart boundary at 70 characters.
MULTIPART_MAX_BOUNDARY = 70

# Unicode categories that show nothing: separators, controls, format characters (ZWSP, ZWJ, BOM, ...).
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})
# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt) outside those categories too:
# Hangul fillers, variation selectors, the combining grapheme joiner and the like. The braille blank is added.
_DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x2800, 0x2800), (0x3164, 0x3164), (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)  # fmt: skip
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# python-multipart logs a warning for each malformed body it meets; that is the client's mistake, answered with
# a 400 that carries the same text, so its parser logs here, below the default level.
_MULTIPART_LOG = logging.getLogger(f"{__name__}.multipart")
_MULTIPART_LOG.setLevel(logging.ERROR)

MaskFormat = Literal["rle", "png"]
BodyKind = Literal["json", "multipart"]


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


def _shown(value: Any, limit: int = 40) -> str:
    """A short ``repr`` of a client's value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _text(value: str, name: str) -> str:
    """``value`` if it is valid Unicode text; a 422 ``invalid_text`` if it holds a surrogate code point.

    Surrogates come from a JSON escape such as ``"\\ud800"`` or from invalid UTF-8 (decoded with
    ``surrogateescape``); neither is text, and the model's tokeniser cannot encode them.
    """
    if _SURROGATE.search(value):
        raise ApiError(
            422,
            "invalid_text",
            f"{name} is not valid Unicode text (invalid UTF-8, or a lone surrogate such as \\ud800)",
            field=name,
        )
    return value


def _utf8(data: bytes) -> str:
    """Client bytes as text; invalid UTF-8 becomes lone surrogates, which :func:`_text` then refuses."""
    return data.decode("utf-8", "surrogateescape")


def _is_invisible(char: str) -> bool:
    """Whitespace, controls, format characters (zero-width space, BOM, ...) and other default-ignorables."""
    if char.isspace() or unicodedata.category(char) in _INVISIBLE_CATEGORIES:
        return True
    code = ord(char)
    return any(low <= code <= high for low, high in _DEFAULT_IGNORABLE)


def parse_expression(value: Any, limits: RequestLimits) -> str:
    """The expression, stripped; 422 when it is not text, shows nothing, or is over the character limit."""
    if value is None:
        raise ApiError(422, "missing_field", "the expression is missing", field="expression")
    if not isinstance(value, str):
        raise ApiError(422, "invalid_field", "the expression must be a string", field="expression")
    text = _text(value, "expression").strip()
    if all(_is_invisible(char) for char in text):
        raise ApiError(
            422,
            "empty_expression",
            "the expression is empty or only invisible characters (whitespace, zero-width or format characters)",
            field="expression",
        )
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
    if isinstance(value, str):
        word = _text(value, name).strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
    raise ApiError(422, "invalid_field", f"{name} must be true or false, got {_shown(value)}", field=name)


def parse_threshold(value: Any) -> float | None:
    """A mask probability threshold in [0, 1] (a JSON number or a decimal string), or None for the model's."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and _DECIMAL.fullmatch(_text(value, "threshold").strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(422, "invalid_field", f"threshold must be a number, got {_shown(value)}", field="threshold")
    try:
        threshold = float(value)
    except OverflowError:  # an int beyond the float range
        threshold = math.inf
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ApiError(422, "invalid_field", f"threshold must be in [0, 1], got {_shown(value)}", field="threshold")
    return threshold


def parse_mask_format(value: Any) -> MaskFormat:
    """``"rle"`` (the default) or ``"png"``."""
    if value is None or value == "":
        return "rle"
    word = _text(value, "mask_format").strip().lower() if isinstance(value, str) else None
    if word not in MASK_FORMATS:
        raise ApiError(422, "invalid_field", f"mask_format must be one of {list(MASK_FORMATS)}", field="mask_format")
    return word  # type: ignore[return-value]


def decode_base64_image(value: Any, limits: RequestLimits) -> bytes:
    """Image bytes from a base64 string (standard alphabet; a ``data:<type>;base64,`` prefix is allowed)."""
    if value is None:
        raise ApiError(422, "missing_field", "the image is missing", field="image")
    if not isinstance(value, str):
        raise ApiError(422, "invalid_field", "image must be a base64 string", field="image")
    text = _text(value, "image")
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ApiError(
                400, "invalid_base64", "an image data URL must read data:<type>;base64,<data>", field="image"
            )
    text = "".join(text.split())  # line-wrapped base64 (76 columns, as MIME writes it) is fine
    if len(text) * 3 // 4 > limits.max_image_bytes + 2:
        raise ApiError(
            413, "image_too_large", f"the image exceeds the limit of {limits.max_image_bytes} bytes", field="image"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", "image is not valid base64", field="image") from None


def _check_names(names: Sequence[str]) -> None:
    """Refuses the first name, in order of appearance, that was sent twice (422) or is not a field (422).

    Both body types go through here, so that the same mistake gets the same code in JSON and multipart.
    """
    for name, count in Counter(names).items():
        if count > 1:
            raise ApiError(422, "duplicate_field", f"{_shown(name)} was sent {count} times", field=name)
        if name not in GROUND_FIELDS:
            raise ApiError(
                422, "unknown_field", f"unknown field {_shown(name)}; accepted: {sorted(GROUND_FIELDS)}", field=name
            )


def _ground_request(fields: Mapping[str, Any], image_bytes: bytes, limits: RequestLimits) -> GroundRequest:
    return GroundRequest(
        image_bytes=image_bytes,
        expression=parse_expression(fields.get("expression"), limits),
        return_mask=parse_bool(fields.get("return_mask"), "return_mask", default=True),
        mask_format=parse_mask_format(fields.get("mask_format")),
        threshold=parse_threshold(fields.get("threshold")),
    )


class _JsonObject(dict):
    """A JSON object that remembers its keys in order, repeats included (a plain dict keeps only the last)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.names = [name for name, _ in pairs]


def _json_int(text: str) -> int:
    # Python refuses to convert more than 4300 digits with a ValueError naming a server setting; refuse earlier.
    if len(text.lstrip("-")) > JSON_MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {JSON_MAX_INT_DIGITS})")
    return int(text)


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_request(body: bytes, limits: RequestLimits) -> GroundRequest:
    """A ``POST /v1/ground`` JSON body: ``{"image": <base64>, "expression": str, ...options}``."""
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty")
    try:
        payload = json.loads(
            _utf8(body), object_pairs_hook=_JsonObject, parse_int=_json_int, parse_constant=_json_constant
        )
    except RecursionError:
        raise ApiError(400, "malformed_json", "the body is not valid JSON: it nests too deeply") from None
    except ValueError as err:  # JSONDecodeError and the hooks' refusals
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(payload, _JsonObject):
        raise ApiError(400, "malformed_json", f"the body must be a JSON object, got {type(payload).__name__}")
    _check_names(payload.names)
    image_bytes = decode_base64_image(payload.get("image"), limits)
    return _ground_request(payload, image_bytes, limits)


def parse_form_request(
    fields: Mapping[str, Sequence[str | bytes | UploadedFile]], limits: RequestLimits
) -> GroundRequest:
    """A ``POST /v1/ground`` multipart body: an ``image`` file part, an ``expression`` text part, options.

    Args:
        fields: Every part by name, in order: a text part as ``str`` or as its raw bytes (UTF-8 expected), a
            file part as :class:`UploadedFile`. A name sent twice is a 422.
        limits: The limits to enforce.
    """
    _check_names([name for name, parts in fields.items() for _ in parts])
    values = {name: _utf8(parts[0]) if isinstance(parts[0], bytes) else parts[0] for name, parts in fields.items()}
    image = values.get("image")
    if image is None:
        raise ApiError(422, "missing_field", "the image file part is missing", field="image")
    if not isinstance(image, UploadedFile):
        raise ApiError(422, "invalid_field", "image must be a file part (filename=...)", field="image")
    for name, value in values.items():
        if name != "image" and isinstance(value, UploadedFile):
            raise ApiError(422, "invalid_field", f"{name} must be a text field, not a file", field=name)
    return _ground_request(values, image.data, limits)


class _MultipartParts:
    """Callbacks for :class:`python_multipart.MultipartParser` that collect each part's name, kind and bytes."""

    def __init__(self) -> None:
        self.fields: dict[str, list[bytes | UploadedFile]] = {}
        self.names: list[str] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header: list[bytearray] = [bytearray(), bytearray()]
        self._data = bytearray()
        self._filename: bytes | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header[1].extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda data, start, end: self._data.extend(data[start:end]),
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._data, self._filename = {}, bytearray(), None

    def _header_end(self) -> None:
        self._headers[bytes(self._header[0]).strip().lower()] = bytes(self._header[1]).strip()
        self._header = [bytearray(), bytearray()]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise ApiError(400, "malformed_multipart", 'a part has no Content-Disposition: form-data; name="..."')
        self.names.append(_utf8(options[b"name"]))
        self._filename = options.get(b"filename")
        if len(self.names) > len(GROUND_FIELDS):  # more parts than fields: one is repeated or unknown
            _check_names(self.names)

    def _part_end(self) -> None:
        part: bytes | UploadedFile = bytes(self._data)
        if self._filename is not None:  # a file part, even with filename="" (a browser's empty file input)
            content_type = self._headers.get(b"content-type")
            part = UploadedFile(
                self._filename.decode("utf-8", "replace"),
                None if content_type is None else content_type.decode("latin-1"),
                bytes(self._data),
            )
        self.fields.setdefault(self.names[-1], []).append(part)

    def _end(self) -> None:
        self.ended = True


def parse_multipart_request(body: bytes, content_type: str | None, limits: RequestLimits) -> GroundRequest:
    """A ``POST /v1/ground`` multipart/form-data body (RFC 7578), already read, with its ``Content-Type``.

    Text parts must be UTF-8 (what browsers send); a part's ``charset`` is not honoured.
    """
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty")
    _, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary", b"")
    if not 1 <= len(boundary) <= MULTIPART_MAX_BOUNDARY:
        raise ApiError(
            400, "malformed_multipart", f"the multipart boundary must have 1 to {MULTIPART_MAX_BOUNDARY} characters"
        )
    parts = _MultipartParts()
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        parser.logger = _MULTIPART_LOG
        parser.write(body)
        parser.finalize()
    except FormParserError as err:
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {err}") from None
    if not parts.ended:
        raise ApiError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    return parse_form_request(parts.fields, limits)
