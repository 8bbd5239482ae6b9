"""The grounding endpoint's HTTP schema: response models and the request bodies, as FastAPI publishes them.

The request body of ``POST /v1/ground`` is parsed by hand (:mod:`pipelines.serve.requests`) because one path takes
both multipart and JSON; :data:`GROUND_REQUEST_BODY` describes both to the OpenAPI schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from pipelines.serve.errors import ERROR_CODES

API_VERSION = "1.0.0"


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="stable identifier, e.g. empty_expression, too_many_pixels, unauthorized")
    message: str = Field(description="explanation for a person")
    field: str | None = Field(default=None, description="the request field at fault")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx response."""

    error: ErrorDetail


class Mask(BaseModel):
    """The mask at the original image's size: COCO compressed RLE (``counts``) or a base64 1-bit PNG (``data``)."""

    format: Literal["rle", "png"]
    size: list[int] = Field(description="[height, width]")
    counts: str | None = Field(default=None, description="COCO compressed RLE counts (format rle)")
    data: str | None = Field(default=None, description="base64 PNG, white = inside (format png)")


class ImageSize(BaseModel):
    """The image as decoded (EXIF orientation applied)."""

    width: int
    height: int


class ModelRef(BaseModel):
    """The model that answered."""

    name: str
    version: str


class Timings(BaseModel):
    """Server-side times in milliseconds, and the size of the batch the request ran in."""

    read_ms: float = Field(description="reading the request body")
    decode_ms: float = Field(description="parsing, image decoding and letterboxing in the ingress")
    queue_ms: float = Field(description="waiting in the model replica for the batch to start")
    inference_ms: float = Field(description="the batch's forward pass and mapping back to original pixels")
    postprocess_ms: float = Field(description="encoding this request's mask")
    model_ms: float = Field(description="the call to the model replica, end to end")
    total_ms: float = Field(description="the whole request in the ingress")
    batch_size: int = Field(description="requests in the forward pass that served this one")


class GroundResponse(BaseModel):
    """The object an expression refers to."""

    box: list[float] | None = Field(description="[x0, y0, x1, y1] in the original image's pixels")
    box_normalized: list[float] | None = Field(description="box divided by [width, height, width, height]")
    image: ImageSize
    expression: str = Field(description="the expression as grounded (surrounding whitespace removed)")
    truncated: bool = Field(description="the expression was longer than the model's token limit and was cut")
    mask: Mask | None = Field(description="null when return_mask is false")
    mask_area: int | None = Field(description="pixels inside the mask")
    threshold: float | None = Field(description="mask probability threshold applied")
    model: ModelRef
    timings: Timings


class HealthResponse(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok", "busy", "unavailable"]
    model: ModelRef | None = None
    detail: str | None = None


class ModelInfoResponse(BaseModel):
    """``GET /v1/model``: the served model, the limits, the batching settings and one replica's counters."""

    api_version: str
    model: dict[str, Any]
    limits: dict[str, int]
    auth: bool = Field(description="whether requests need a bearer token")
    stats: dict[str, Any] = Field(description="counters of the model replica that answered this request")


_OPTIONS = {
    "return_mask": {"type": "boolean", "default": True, "description": "compute and return the mask"},
    "mask_format": {"type": "string", "enum": ["rle", "png"], "default": "rle"},
    "threshold": {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "mask probability threshold (default: the model's)",
    },
}

GROUND_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "expression"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, GIF or BMP"},
                        "expression": {"type": "string", "description": "the referring expression"},
                        **_OPTIONS,
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image", "expression"],
                    "additionalProperties": False,
                    "properties": {
                        "image": {"type": "string", "format": "byte", "description": "base64 (data: URL allowed)"},
                        "expression": {"type": "string"},
                        **_OPTIONS,
                    },
                }
            },
        },
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given error statuses, all with the :class:`ErrorBody` schema; each status's
    description lists its codes from :data:`~pipelines.serve.errors.ERROR_CODES`."""

    def describe(status: int) -> str:
        codes = [f"`{code}`: {error.when}" for code, error in ERROR_CODES.items() if error.status == str(status)]
        if not codes:
            raise ValueError(f"no error code has status {status}")
        return "; ".join(codes)

    return {status: {"model": ErrorBody, "description": describe(status)} for status in statuses}
