"""The Ray Serve grounding application: a FastAPI ingress in front of the batched model deployment.

Build it with :func:`build_app`, the import path that ``serve run``, ``serve deploy`` and ``jobs.serve`` use, from
:class:`~pipelines.serve.settings.ServeSettings`::

    serve run pipelines.serve:build_app model=runs/vglaw-synthetic/model
    serve deploy cluster/serve.yaml

The ingress (:class:`GroundingAPI`) authenticates, validates and decodes every request
(:mod:`pipelines.serve.requests`), letterboxes the image and hands a small canvas to :class:`GroundingModel`
(:mod:`pipelines.serve.model`), which batches concurrent requests into one forward pass.
"""

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from importlib import resources
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serve.model import MODEL_DEPLOYMENT, GroundingItem, GroundingModel, GroundingOutcome
from pipelines.serve.requests import (
    ApiError,
    GroundRequest,
    RequestLimits,
    UploadedFile,
    authorize,
    body_kind,
    check_content_length,
    open_image,
    parse_form_request,
    parse_json_request,
)
from pipelines.serve.schema import (
    API_VERSION,
    GROUND_REQUEST_BODY,
    GroundResponse,
    HealthResponse,
    ModelInfoResponse,
    error_responses,
)
from pipelines.serve.settings import TOKEN_ENV, ServeSettings
from vglaw.geometry import Letterbox

__all__ = ["INGRESS_DEPLOYMENT", "MODEL_DEPLOYMENT", "GroundingAPI", "build_app"]

logger = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "GroundingAPI"
HEALTH_TIMEOUT_S = 5.0
LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(RequestLimits))


def limits_from_user_config(config: Mapping[str, Any]) -> tuple[RequestLimits, str | None]:
    """The ingress ``user_config``: the :class:`RequestLimits` fields and optionally ``auth_token``."""
    unknown = sorted(set(config) - {*LIMIT_KEYS, "auth_token"})
    if unknown:
        raise ValueError(f"unknown {INGRESS_DEPLOYMENT} user_config keys {unknown}")
    limits = RequestLimits(**{k: config[k] for k in LIMIT_KEYS if k in config})
    token = config.get("auth_token")
    if token is not None and not isinstance(token, str):
        raise ValueError("auth_token must be a string")
    return limits, token or None


def prepare_item(request: GroundRequest, limits: RequestLimits, image_size: int) -> tuple[GroundingItem, int, int]:
    """Decodes and letterboxes the image (as :meth:`vglaw.Predictor.predict` does); returns the item and w, h."""
    image = open_image(request.image_bytes, limits)
    fit = Letterbox.fit(image.width, image.height, image_size)
    canvas = np.asarray(fit.image(image))  # uint8 [S, S, 3]
    item = GroundingItem(canvas, fit, request.expression, request.return_mask, request.mask_format, request.threshold)
    return item, image.width, image.height


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it exceeds ``limit`` bytes."""
    check_content_length(request.headers.get("content-length"), limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_multipart(request: Request, body: bytes, limits: RequestLimits) -> GroundRequest:
    """Parses an already read multipart body with Starlette's parser (python-multipart)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    fields: dict[str, list[str | UploadedFile]] = {}
    try:
        form = await Request(request.scope, receive=replay).form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    except StarletteHTTPException as err:
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {err.detail}") from None
    except Exception as err:  # python-multipart raises its own types for broken framing
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {err}") from None
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                part: str | UploadedFile = UploadedFile(value.filename, value.content_type, await value.read())
            else:
                part = value
            fields.setdefault(name, []).append(part)
    finally:
        await form.close()
    return parse_form_request(fields, limits)


app = FastAPI(
    title="VG-LAW visual grounding",
    version=API_VERSION,
    description="Image + referring expression -> box and mask of the object referred to. See docs/api.md.",
)


@app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    body = ApiError(err.status_code, code, str(err.detail)).body()
    return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(ApiError(422, "invalid_request", str(err.errors())).body(), status_code=422)


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, err: Exception) -> JSONResponse:
    # Input problems are ApiErrors; anything else is a bug, logged here and answered as JSON like the rest.
    logger.error("unexpected error: %s: %s", type(err).__name__, err, exc_info=err)
    return JSONResponse(ApiError(500, "internal_error", "unexpected server error").body(), status_code=500)


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class GroundingAPI:
    """HTTP front of the grounding application: auth, validation, decoding, the web page.

    Args:
        model: Handle to the :class:`GroundingModel` deployment.
        auth_token: Bearer token for ``/v1/*``; None falls back to ``$VGLAW_SERVE_TOKEN`` in this replica.
    """

    def __init__(self, model: DeploymentHandle, auth_token: str | None = None) -> None:
        self.model = model
        self._init_token = auth_token or os.environ.get(TOKEN_ENV) or None
        self.auth_token = self._init_token
        self.limits = RequestLimits()
        self._page = resources.files("pipelines.serve").joinpath("static", "index.html").read_text(encoding="utf-8")
        self._model_info: dict[str, Any] | None = None

    def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Limits and (optionally) the token from ``user_config``; a token there overrides the start-up one."""
        self.limits, token = limits_from_user_config(user_config)
        self.auth_token = token or self._init_token

    async def _info(self) -> dict[str, Any]:
        if self._model_info is None:  # the served model does not change for the deployment's life
            self._model_info = await self.model.info.remote()
        return self._model_info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The web page: choose an image, type an expression, see the box and mask."""
        return HTMLResponse(self._page)

    @app.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def healthz(self) -> JSONResponse:
        """200 when a model replica answers within a few seconds, else 503. Needs no token."""
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as err:
            body = HealthResponse(status="unavailable", detail=f"{type(err).__name__}: {err}")
            return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
        model = {"name": info["name"], "version": info["version"]}
        return JSONResponse(HealthResponse(status="ok", model=model).model_dump(exclude_none=True))

    @app.get("/v1/model", response_model=ModelInfoResponse, responses=error_responses(401, 503))
    async def model_info(self, request: Request) -> ModelInfoResponse:
        """The served model, limits, batching settings and the answering model replica's counters."""
        authorize(request.headers.get("authorization"), self.auth_token)
        info, stats = await asyncio.gather(self.model.info.remote(), self.model.stats.remote())
        return ModelInfoResponse(
            api_version=API_VERSION, model=info, limits=asdict(self.limits), auth=bool(self.auth_token), stats=stats
        )

    @app.post(
        "/v1/ground",
        response_model=GroundResponse,
        responses=error_responses(400, 401, 413, 415, 422, 503),
        openapi_extra=GROUND_REQUEST_BODY,
    )
    async def ground(self, request: Request) -> GroundResponse:
        """Grounds an expression in an image: multipart (``image`` file + ``expression``) or JSON with base64."""
        start = time.perf_counter()
        authorize(request.headers.get("authorization"), self.auth_token)
        limits = self.limits
        kind = body_kind(request.headers.get("content-type"))
        body = await read_body(request, limits.max_request_bytes)
        read_done = time.perf_counter()
        if kind == "json":
            parsed = await asyncio.to_thread(parse_json_request, body, limits)
        else:
            parsed = await parse_multipart(request, body, limits)
        info = await self._info()
        # Decoding is CPU work: a thread keeps this replica's event loop serving other requests meanwhile.
        item, width, height = await asyncio.to_thread(prepare_item, parsed, limits, info["image_size"])
        decode_done = time.perf_counter()
        outcome = await self._call_model(item)
        model_done = time.perf_counter()
        if outcome.error is not None:
            raise ApiError(outcome.error.status, outcome.error.code, outcome.error.message)
        return GroundResponse(
            box=outcome.box,
            box_normalized=outcome.box_normalized,
            image={"width": width, "height": height},
            expression=parsed.expression,
            truncated=outcome.truncated,
            mask=outcome.mask,
            mask_area=outcome.mask_area,
            threshold=outcome.threshold,
            model={"name": info["name"], "version": info["version"]},
            timings={
                "read_ms": (read_done - start) * 1000,
                "decode_ms": (decode_done - read_done) * 1000,
                "queue_ms": outcome.queue_ms,
                "inference_ms": outcome.inference_ms,
                "postprocess_ms": outcome.postprocess_ms,
                "model_ms": (model_done - decode_done) * 1000,
                "total_ms": (time.perf_counter() - start) * 1000,
                "batch_size": outcome.batch_size,
            },
        )

    async def _call_model(self, item: GroundingItem) -> GroundingOutcome:
        try:
            return await self.model.ground.remote(item)
        except BackPressureError as err:
            raise ApiError(503, "overloaded", f"the model is at capacity, retry later: {err}") from None
        except ray.exceptions.RayError as err:
            raise ApiError(503, "model_unavailable", f"the model replica failed: {type(err).__name__}") from None


# NOTE: this module has no ``from __future__ import annotations``: Serve reads build_app's parameter annotation
# at run time and validates the args into it only when it is the ServeSettings class itself, not a string.
def build_app(args: ServeSettings) -> serve.Application:
    """The Serve application for ``args``.

    This is the import path ``pipelines.serve:build_app`` of ``serve run`` and Serve config files: Serve sees the
    annotation and validates the ``key=value`` pairs or the config's ``args:`` into :class:`ServeSettings` before
    calling it. A config's ``deployments`` section overrides the options set here (replicas, resources,
    ``user_config``). Python callers may pass the same mapping a config holds; it is validated alike.
    """
    settings = ServeSettings.model_validate(args)
    model, path = settings.model, settings.model_path()
    if path is not None and path.exists():
        model = str(path.resolve())  # replicas may start in another working directory
    model_options: dict[str, Any] = {
        "max_ongoing_requests": settings.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "user_config": asdict(settings.batch_settings()),
    }
    if settings.max_replicas > settings.min_replicas:
        model_options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        }
    else:
        model_options["num_replicas"] = settings.max_replicas
    model_app = GroundingModel.options(**model_options).bind(model, settings.device, settings.precision)
    ingress = GroundingAPI.options(
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        user_config=asdict(settings.limits()),
    )
    return ingress.bind(model_app, settings.auth_token or os.environ.get(TOKEN_ENV) or None)
