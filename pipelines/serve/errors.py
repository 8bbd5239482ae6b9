"""The grounding endpoint's errors: every code a client can receive, and the exception that carries one.

Free of Ray and of the HTTP framework, so that request parsing, the ingress and the OpenAPI schema share them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["ERROR_CODES", "JSON_MAX_INT_DIGITS", "ApiError", "ErrorCode"]

# A JSON integer with more digits than this is refused before Python converts it (its own limit is 4300 digits).
JSON_MAX_INT_DIGITS = 100


class ErrorCode(NamedTuple):
    """One documented error: its HTTP status (``"4xx"`` where the HTTP layer chooses) and when it happens."""

    status: str
    when: str


# Every ``code`` a client can receive, defined once. docs/api.md lists exactly these (a test compares them, and
# checks every ApiError raised in pipelines/serve against this table). 4xx: the client's mistake; 5xx: ours.
ERROR_CODES: dict[str, ErrorCode] = {
    "empty_body": ErrorCode("400", "the request body is empty"),
    "bad_content_length": ErrorCode("400", "the Content-Length header is not an integer"),
    "malformed_json": ErrorCode(
        "400",
        "the JSON body cannot be parsed: not JSON, not an object, nested too deeply, an integer over "
        f"{JSON_MAX_INT_DIGITS} digits, or NaN/Infinity",
    ),
    "malformed_multipart": ErrorCode(
        "400", "the multipart body cannot be parsed: no boundary, broken framing, a part without a name"
    ),
    "invalid_base64": ErrorCode("400", "the JSON `image` is not base64, or not a `data:<type>;base64,<data>` URL"),
    "empty_image": ErrorCode("400", "the image has 0 bytes"),
    "invalid_image": ErrorCode("400", "not a JPEG, PNG, WebP, GIF or BMP, or undecodable"),
    "truncated_image": ErrorCode("400", "the image data ends early"),
    "unauthorized": ErrorCode("401", "a token is configured and `Authorization: Bearer <token>` is missing or wrong"),
    "not_found": ErrorCode("404", "no such path"),
    "method_not_allowed": ErrorCode("405", "the path exists but not for this method (the `Allow` header lists them)"),
    "body_timeout": ErrorCode("408", "the body did not arrive within `body_timeout_s` (a slow or stalled client)"),
    "request_too_large": ErrorCode("413", "the body exceeds the image limit (as base64) plus 64 KiB"),
    "image_too_large": ErrorCode("413", "the image exceeds `max_image_bytes`"),
    "too_many_pixels": ErrorCode(
        "413",
        "width x height exceeds `max_image_pixels`, read from the header before decoding "
        "(decompression bombs end here)",
    ),
    "unsupported_media_type": ErrorCode("415", "a Content-Type other than multipart/form-data or application/json"),
    "missing_field": ErrorCode("422", "`image` or `expression` is missing (a JSON null counts as missing)"),
    "unknown_field": ErrorCode("422", "a field name outside the accepted ones (a typo)"),
    "duplicate_field": ErrorCode("422", "a field sent twice: a repeated multipart part or a repeated JSON key"),
    "invalid_field": ErrorCode("422", "a field of the wrong type or out of range (e.g. `threshold` 1.5)"),
    "invalid_text": ErrorCode(
        "422",
        "a text field is not valid Unicode: invalid UTF-8 in a multipart part or JSON string, or a lone "
        "surrogate escape such as `\\ud800`",
    ),
    "empty_expression": ErrorCode(
        "422", "the expression is empty or only invisible characters (whitespace, zero-width, format characters)"
    ),
    "expression_too_long": ErrorCode("422", "the expression has more than `max_expression_chars` characters"),
    "invalid_request": ErrorCode("422", "the HTTP layer's own request validation failed"),
    "headers_too_large": ErrorCode("431", "the request headers exceed `max_header_bytes`"),
    "http_error": ErrorCode("4xx", "another refusal by the HTTP layer, with its status"),
    "internal_error": ErrorCode("500", "a fault of the server (logged there); not caused by the request"),
    "inference_failed": ErrorCode("500", "the model failed on this input (other requests of its batch are unaffected)"),
    "encoding_failed": ErrorCode("500", "encoding this request's mask failed"),
    "overloaded": ErrorCode("503", "the model is at capacity; retry later"),
    "model_unavailable": ErrorCode("503", "no model replica could take the request; retry"),
    "request_timeout": ErrorCode(
        "504", "no answer within `request_timeout_s` (a long queue or a stalled model replica); retry"
    ),
}


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
        # Both may quote what the client sent: made encodable (a lone surrogate would fail the JSON response).
        self.message = _printable(message)
        self.field = None if field is None else _printable(field[:100])
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": {"code", "message", "field"?}}``."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def _printable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes, so that it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
