"""A Python client of the grounding endpoint: ``POST /v1/ground``, ``GET /healthz`` and ``GET /v1/model``.

Free of Ray and torch (``requests``, numpy, PIL and pycocotools only), so that any process can call a served
model::

    from pipelines.serve.client import GroundingClient

    with GroundingClient("http://127.0.0.1:8000", token=os.environ.get("VGLAW_SERVE_TOKEN")) as client:
        result = client.ground("photo.jpg", "the dog on the left")
        print(result.box, result.mask_area)  # xyxy in the photo's pixels; result.mask is bool [H, W]

Every failure raises :class:`GroundingError`, with the server's error ``code`` (docs/api.md, "Errors") or
``connection_error`` / ``timeout`` / ``unexpected_response`` for what happened on the way.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests
from PIL import Image

from vglaw.images import to_rgb8
from vglaw.rle import decode_rle

__all__ = ["AuthError", "GroundingClient", "GroundingError", "GroundingResult", "ImageInput", "OverloadedError"]

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray


class GroundingError(Exception):
    """A request that got no grounding.

    Attributes:
        status: The HTTP status; None when no answer arrived (``connection_error``, ``timeout``).
        code: The server's error code (docs/api.md lists them); ``http_error`` for a non-JSON error answer (Ray's
            proxy answers a few in plain text); ``connection_error``, ``timeout`` or ``unexpected_response``
            for failures on the client's side.
        message: What went wrong, for a person.
        retry_after: Seconds to wait before retrying, from a ``Retry-After`` header (503s); None otherwise.
    """

    def __init__(self, status: int | None, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code} ({status}): {message}" if status is not None else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class AuthError(GroundingError):
    """401: the endpoint needs a token and the client's is missing or wrong."""


class OverloadedError(GroundingError):
    """503: the model is at capacity or no replica could take the request; retry after ``retry_after`` s."""


@dataclass(frozen=True)
class GroundingResult:
    """The object an expression refers to, as the server answered (docs/api.md, ``POST /v1/ground``).

    Attributes:
        box: ``(x0, y0, x1, y1)`` in the pixels of the image as sent; None when the model has no box head.
        box_normalized: ``box`` divided by ``(width, height, width, height)``.
        mask: bool ``[height, width]``, decoded from the server's COCO RLE; None with ``return_mask=False``.
        mask_area: Pixels inside the mask.
        threshold: The mask probability threshold the server applied.
        width: Width of the image as the server decoded it (EXIF orientation applied).
        height: Its height.
        expression: The expression as grounded (surrounding whitespace removed).
        truncated: The expression had more tokens than the model reads and was cut.
        model: The served model's ``{"name", "version"}``.
        raw: The whole JSON answer (``timings`` included).
    """

    box: tuple[float, float, float, float] | None
    box_normalized: tuple[float, float, float, float] | None
    mask: np.ndarray | None
    mask_area: int | None
    threshold: float | None
    width: int
    height: int
    expression: str
    truncated: bool
    model: dict[str, str]
    raw: dict[str, Any]

    @classmethod
    def from_response(cls, body: dict[str, Any]) -> GroundingResult:
        """The result for a ``200`` answer's JSON; raises :class:`GroundingError` (``unexpected_response``) for
        a body that is not one."""
        try:
            image = body["image"]
            return cls(
                box=_quad(body["box"]),
                box_normalized=_quad(body["box_normalized"]),
                mask=decode_mask(body["mask"]),
                mask_area=body["mask_area"],
                threshold=body["threshold"],
                width=int(image["width"]),
                height=int(image["height"]),
                expression=body["expression"],
                truncated=bool(body["truncated"]),
                model=dict(body["model"]),
                raw=body,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GroundingError(200, "unexpected_response", f"not a grounding answer: {err!r}") from err


def decode_mask(payload: dict[str, Any] | None) -> np.ndarray | None:
    """A response's ``mask`` (``{"format": "rle", "size": [h, w], "counts"}``) as a bool ``[h, w]`` array."""
    if payload is None:
        return None
    if payload.get("format") != "rle":
        raise ValueError(f"expected an RLE mask, got format {payload.get('format')!r}")
    return decode_rle(payload["counts"], payload["size"]).astype(bool)


def encode_image(image: ImageInput) -> tuple[str, bytes]:
    """``(file name, bytes)`` to upload for ``image``.

    A path is read and sent as it is, and so are bytes (the server checks the format). A PIL image or a numpy
    array is converted to 8-bit RGB by :func:`vglaw.images.to_rgb8`, the conversion the server and
    :class:`vglaw.Predictor` apply, and sent as a lossless PNG.
    """
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            return os.path.basename(os.fspath(image)) or "image", file.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    if isinstance(image, (Image.Image, np.ndarray)):
        buffer = io.BytesIO()
        to_rgb8(image).save(buffer, format="PNG")
        return "image.png", buffer.getvalue()
    raise TypeError(f"image must be a path, bytes, a PIL image or a numpy array, got {type(image).__name__}")


class GroundingClient:
    """A client of one grounding endpoint; reuses its connections (close it, or use it in a ``with`` block).

    Args:
        url: The application's base URL, e.g. ``http://127.0.0.1:8000`` (with the route prefix, if any).
        token: The bearer token for ``/v1/*``, when the server has one.
        timeout: Seconds to wait for the connection and for each read of the answer.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def ground(
        self, image: ImageInput, expression: str, threshold: float | None = None, return_mask: bool = True
    ) -> GroundingResult:
        """Grounds ``expression`` in ``image`` (a path, bytes, a PIL image or an RGB ``[H, W, 3]`` uint8 array).

        Args:
            threshold: Mask probability threshold in [0, 1]; None: the server's.
            return_mask: Compute and return the mask.

        Raises:
            GroundingError: With the server's code for a refused request (e.g. ``empty_expression``, 422);
                :class:`AuthError` for 401, :class:`OverloadedError` for 503.
        """
        name, data = encode_image(image)
        fields = {"expression": expression, "mask_format": "rle", "return_mask": "true" if return_mask else "false"}
        if threshold is not None:
            fields["threshold"] = repr(float(threshold))
        response = self._request("POST", "/v1/ground", files={"image": (name, data)}, data=fields)
        return GroundingResult.from_response(self._json(response))

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok" | "busy" | "unavailable", ...}``. An unavailable model (503) is an
        answer here, not an error; only a failure to get an answer raises :class:`GroundingError`."""
        response = self._request("GET", "/healthz")
        if response.status_code == 503:
            try:
                return response.json()
            except ValueError:
                pass
        return self._json(response)

    def model_info(self) -> dict[str, Any]:
        """``GET /v1/model``: the served model, the limits, the batching settings and one replica's counters."""
        return self._json(self._request("GET", "/v1/model"))

    def close(self) -> None:
        """Closes the pooled connections."""
        self._session.close()

    def __enter__(self) -> GroundingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.url}{path}"
        try:
            return self._session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.ConnectionError as err:  # NOTE: before Timeout: a ConnectTimeout is both
            raise GroundingError(None, "connection_error", f"cannot reach {url}: {err}") from err
        except requests.Timeout as err:
            raise GroundingError(None, "timeout", f"no answer from {url} within {self.timeout:g} s") from err
        except requests.RequestException as err:
            raise GroundingError(None, "connection_error", f"request to {url} failed: {err}") from err

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any]:
        """The JSON body of a 2xx answer; raises :func:`error_from_response` for any other."""
        if not 200 <= response.status_code < 300:
            raise error_from_response(response.status_code, response.headers, response.content)
        try:
            body = response.json()
        except ValueError as err:
            raise GroundingError(response.status_code, "unexpected_response", "the answer is not JSON") from err
        if not isinstance(body, dict):
            raise GroundingError(response.status_code, "unexpected_response", "the answer is not a JSON object")
        return body


def error_from_response(status: int, headers: Any, content: bytes) -> GroundingError:
    """The :class:`GroundingError` (subclass by status) for an error answer: its JSON ``{"error": {"code",
    "message"}}``, or for a body that is not one (Ray's proxy answers a few in plain text) ``http_error`` with
    the text."""
    code, message = "http_error", content[:500].decode("utf-8", "replace").strip() or f"HTTP {status}"
    try:
        error = json.loads(content)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    kind = {401: AuthError, 503: OverloadedError}.get(status, GroundingError)
    return kind(status, code, message, retry_after=_retry_after(headers.get("Retry-After")))


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds; None when absent or an HTTP date (the server sends seconds)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _quad(values: Any) -> tuple[float, float, float, float] | None:
    if values is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1
