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
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from importlib import resources
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.serve.errors import ApiError
from pipelines.serve.images import open_image
from pipelines.serve.model import MODEL_DEPLOYMENT, GroundingItem, GroundingModel, GroundingOutcome, ItemError
from pipelines.serve.requests import (
    GroundRequest,
    RequestLimits,
    authorize,
    body_kind,
    check_content_length,
    parse_json_request,
    parse_multipart_request,
)
from pipelines.serve.schema import (
    API_VERSION,
    GROUND_REQUEST_BODY,
    GroundResponse,
    HealthResponse,
    ModelInfoResponse,
    error_responses,
)
from pipelines.serve.settings import TOKEN_ENV, ConnectionLimits, ServeSettings
from vglaw.geometry import Letterbox

__all__ = ["INGRESS_DEPLOYMENT", "MODEL_DEPLOYMENT", "GroundingAPI", "build_app"]

logger = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "GroundingAPI"
HEALTH_TIMEOUT_S = 5.0
# A URI scheme of two or more characters (one would be a Windows drive letter).
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
MODEL_ERROR_MESSAGES = {
    "inference_failed": "the model failed on this input",
    "encoding_failed": "encoding the mask failed",
}
LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(RequestLimits))
# Request latency buckets in ms: a lone CPU request of a small model is tens of ms, a queued GPU batch hundreds,
# and nothing outlasts the 60 s default request deadline.
LATENCY_BOUNDARIES_MS = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
NO_ERROR_CODE = "none"  # the code tag of an answer without an error body
UNMATCHED_ROUTE = "unmatched"  # the route tag of a path no route matches (404s), so unknown paths add no series


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


def check_header_size(headers: Sequence[tuple[bytes, bytes]], limit: int) -> None:
    """Refuses with a 431 a request whose headers (as sent: ``name: value`` lines) exceed ``limit`` bytes.

    NOTE: Ray's proxy runs uvicorn with httptools, which takes headers of any size, and Serve exposes no
    option for it; this check keeps oversized headers (e.g. cookies) from the rest of the ingress.
    """
    size = sum(len(name) + len(value) + 4 for name, value in headers)  # ": " and CRLF
    if size > limit:
        raise ApiError(
            431,
            "headers_too_large",
            f"the request headers have {size} bytes; the limit is {limit}",
            headers={"Connection": "close"},
        )


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused with a 413 as soon as it exceeds ``limit`` bytes and with a 408 when it has not
    arrived within ``timeout_s`` seconds (a slow or stalled client must not hold the ingress)."""
    check_content_length(request.headers.get("content-length"), limit)
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"the request body did not arrive within {timeout_s:g} s ({total} bytes received)",
            headers={"Connection": "close"},  # the rest of the body is never read: close, not keep alive
        ) from None
    return b"".join(chunks)


@asynccontextmanager
async def request_deadline(timeout_s: float | None) -> AsyncIterator[None]:
    """Bounds the block to ``timeout_s`` seconds (None: no bound), then answers 504 ``request_timeout``; whatever
    the block awaited (a queued model call) is cancelled."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise ApiError(504, "request_timeout", f"no answer within {timeout_s:g} s; retry later") from None


class RequestMetrics:
    """The ingress replica's Serve metrics (docs/api.md, "Metrics"); Serve adds the deployment, replica and
    application tags, and Ray exports them with a ``ray_`` prefix."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "vglaw_requests",
            description="HTTP requests answered by the ingress, by route template, status and error code",
            tag_keys=("route", "status", "code"),
        )
        self.latency_ms = metrics.Histogram(
            "vglaw_request_latency_ms",
            description="time from a request's arrival in the ingress to its answer, in ms",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route", "status"),
        )

    def record(self, route: str, status: int, code: str, latency_ms: float) -> None:
        """One answered request."""
        self.requests.inc(tags={"route": route, "status": str(status), "code": code})
        self.latency_ms.observe(latency_ms, tags={"route": route, "status": str(status)})


def note_error_code(request: Request, code: str) -> None:
    """Tells :class:`RequestMetricsMiddleware` the error code of the answer being made."""
    request.state.error_code = code


class RequestMetricsMiddleware:
    """Records every HTTP answer of the app in the replica's :class:`RequestMetrics`: the matched route's
    template (``/v1/ground``), the status sent, the error code the exception handlers noted, the latency.

    A plain ASGI middleware (not ``BaseHTTPMiddleware``), so that bodies stream and client disconnects reach
    the app as they did. It sits inside Starlette's ``ServerErrorMiddleware``: an exception passing through
    it is answered 500 ``internal_error`` (by ``_unexpected_error``) after it has been recorded as such.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None
        code: str | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            status, code = status or 499, NO_ERROR_CODE  # Serve cancels a request whose client left
            raise
        except Exception:
            status, code = status or 500, "internal_error"
            raise
        finally:
            recorder = _replica_metrics()
            if recorder is not None:
                route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
                code = code or scope.get("state", {}).get("error_code", NO_ERROR_CODE)
                try:
                    recorder.record(route, status or 500, code, (time.perf_counter() - start) * 1000)
                except Exception:  # a metric must never fail the request it describes
                    logger.exception("recording the request metrics failed")


def _replica_metrics() -> RequestMetrics | None:
    """The metrics of the ingress replica serving the app; None outside a replica (the app alone)."""
    try:
        ingress = serve.get_replica_context().servable_object
    except RayServeException:
        return None
    return getattr(ingress, "metrics", None)


app = FastAPI(
    title="VG-LAW visual grounding",
    version=API_VERSION,
    description="Image + referring expression -> box and mask of the object referred to. See docs/api.md.",
)
app.add_middleware(RequestMetricsMiddleware)


@app.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    note_error_code(request, err.code)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def model_error(error: ItemError) -> ApiError:
    """The client's answer for an item the model replica refused or failed: always a 5xx.

    The ingress validated the request, so a refusal (4xx) by the replica is a disagreement between the two, a
    server fault; the replica's message stays in the logs, since it may quote server internals.
    """
    if error.status < 500:
        logger.error("the model replica refused a validated item: %s (%d): %s", error.code, error.status, error.message)
        return ApiError(500, "internal_error", "unexpected server error")
    logger.warning("the model failed on an item: %s: %s", error.code, error.message)
    return ApiError(error.status, error.code, MODEL_ERROR_MESSAGES.get(error.code, "the model failed on this input"))


def public_source(source: str) -> str:
    """The model's source as clients may see it: a URI (``models:/name@alias``, ``s3://...``) as given, without
    credentials; a local path (or ``file:`` URI) by its last component only, so that no server path leaks."""
    if not _URI.match(source) or source.lower().startswith("file:"):
        return re.split(r"[\\/]", source.rstrip("\\/"))[-1]
    scheme, sep, rest = source.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:  # user:password@host
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def http_layer_error(request: Request, err: StarletteHTTPException) -> ApiError:
    """The documented error for one raised by Starlette or FastAPI themselves (unknown path, wrong method, ...)."""
    status, headers = err.status_code, dict(getattr(err, "headers", None) or {})
    if status == 404:
        return ApiError(404, "not_found", f"no such path: {request.url.path}", headers=headers)
    if status == 405:
        allowed = headers.get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        return ApiError(405, "method_not_allowed", message, headers=headers)
    if 400 <= status < 500:
        return ApiError(status, "http_error", str(err.detail), headers=headers)
    logger.error("HTTP layer error %d: %s", status, err.detail)
    return ApiError(500, "internal_error", "unexpected server error")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return await _api_error(request, http_layer_error(request, err))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    note_error_code(request, "invalid_request")
    return JSONResponse(ApiError(422, "invalid_request", str(err.errors())).body(), status_code=422)


@app.exception_handler(ClientDisconnect)
async def _client_disconnect(request: Request, _: ClientDisconnect) -> Response:
    # The client left while its body was being read: nothing is wrong here and nobody reads the answer.
    logger.info("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request", as Ray's proxy counts it


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
        connection: Body deadline, header limit and ``Retry-After``; None: the defaults.
    """

    def __init__(
        self, model: DeploymentHandle, auth_token: str | None = None, connection: ConnectionLimits | None = None
    ) -> None:
        self.model = model
        self.connection = connection or ConnectionLimits()
        self._init_token = auth_token or os.environ.get(TOKEN_ENV) or None
        self.auth_token = self._init_token
        self.limits = RequestLimits()
        self._page = resources.files("pipelines.serve").joinpath("static", "index.html").read_text(encoding="utf-8")
        self._model_info: dict[str, Any] | None = None
        self.metrics = RequestMetrics()

    def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Limits and (optionally) the token from ``user_config``; a token there overrides the start-up one."""
        self.limits, token = limits_from_user_config(user_config)
        self.auth_token = token or self._init_token

    async def _info(self) -> dict[str, Any]:
        if self._model_info is None:  # the served model does not change for the deployment's life
            with self._model_errors():
                self._model_info = await self.model.info.remote()
        return self._model_info

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The web page: choose an image, type an expression, see the box and mask."""
        return HTMLResponse(self._page)

    @app.api_route(
        "/healthz", methods=["GET", "HEAD"], response_model=HealthResponse, responses={503: {"model": HealthResponse}}
    )
    async def healthz(self) -> JSONResponse:
        """200 when a model replica answers within a few seconds, or when the model's queue is full (``busy``: the
        replicas live, they are loaded, and requests get 503 with Retry-After); else 503. Needs no token."""
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=HEALTH_TIMEOUT_S)
        except BackPressureError:
            # NOTE: a full queue is load, not a fault: a load balancer that took the endpoint out now would shift
            # the load onto the others exactly when it peaks.
            return JSONResponse(HealthResponse(status="busy", detail="the model's queue is full").model_dump())
        except Exception as err:
            # Only the type: the message of a failed replica may name files on the server.
            logger.warning("health check failed: %s: %s", type(err).__name__, err)
            body = HealthResponse(status="unavailable", detail=type(err).__name__)
            return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
        model = {"name": info["name"], "version": info["version"]}
        return JSONResponse(HealthResponse(status="ok", model=model).model_dump(exclude_none=True))

    @app.get("/v1/model", response_model=ModelInfoResponse, responses=error_responses(401, 431, 503))
    async def model_info(self, request: Request) -> ModelInfoResponse:
        """The served model, limits, batching settings and the answering model replica's counters."""
        check_header_size(request.scope["headers"], self.connection.max_header_bytes)
        authorize(request.headers.get("authorization"), self.auth_token)
        with self._model_errors():
            info, stats = await asyncio.gather(self.model.info.remote(), self.model.stats.remote())
        info = {**info, "source": public_source(info["source"])}
        return ModelInfoResponse(
            api_version=API_VERSION, model=info, limits=asdict(self.limits), auth=bool(self.auth_token), stats=stats
        )

    @app.post(
        "/v1/ground",
        response_model=GroundResponse,
        responses=error_responses(400, 401, 408, 413, 415, 422, 431, 500, 503, 504),
        openapi_extra=GROUND_REQUEST_BODY,
    )
    async def ground(self, request: Request) -> GroundResponse:
        """Grounds an expression in an image: multipart (``image`` file + ``expression``) or JSON with base64."""
        start = time.perf_counter()
        check_header_size(request.scope["headers"], self.connection.max_header_bytes)
        authorize(request.headers.get("authorization"), self.auth_token)
        async with request_deadline(self.connection.request_timeout_s):
            return await self._ground(request, start)

    async def _ground(self, request: Request, start: float) -> GroundResponse:
        limits = self.limits
        kind = body_kind(request.headers.get("content-type"))
        body = await read_body(request, limits.max_request_bytes, self.connection.body_timeout_s)
        read_done = time.perf_counter()
        if kind == "json":
            parsed = await asyncio.to_thread(parse_json_request, body, limits)
        else:
            content_type = request.headers.get("content-type")
            parsed = await asyncio.to_thread(parse_multipart_request, body, content_type, limits)
        info = await self._info()
        # Decoding is CPU work: a thread keeps this replica's event loop serving other requests meanwhile.
        item, width, height = await asyncio.to_thread(prepare_item, parsed, limits, info["image_size"])
        decode_done = time.perf_counter()
        outcome = await self._call_model(item)
        model_done = time.perf_counter()
        if outcome.error is not None:
            raise model_error(outcome.error)
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
        with self._model_errors():
            return await self.model.ground.remote(item)

    @contextmanager
    def _model_errors(self) -> Iterator[None]:
        """Calls to the model deployment: a full queue (``max_queued_requests``) or a lost replica is a 503 to retry."""
        retry = {"Retry-After": str(self.connection.retry_after_s)}
        try:
            yield
        except BackPressureError as err:
            raise ApiError(503, "overloaded", f"the model is at capacity, retry later: {err}", headers=retry) from None
        except ray.exceptions.RayError as err:
            message = f"the model replica failed: {type(err).__name__}"
            raise ApiError(503, "model_unavailable", message, headers=retry) from None


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
    # NOTE: the model's queue is at each caller (the ingress replicas' handles), whose BackPressureError the
    # ingress answers as JSON; the ingress's queue is at the proxies, which answer for it themselves.
    backpressure = {"status_code": 503, "retry_after_s": settings.retry_after_s}
    model_options: dict[str, Any] = {
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": backpressure,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "user_config": asdict(settings.batch_settings()),
    }
    autoscaling = settings.autoscaling_config()
    if autoscaling is not None:
        model_options["autoscaling_config"] = autoscaling
    else:
        model_options["num_replicas"] = settings.max_replicas
    model_app = GroundingModel.options(**model_options).bind(model, settings.device, settings.precision)
    ingress = GroundingAPI.options(
        num_replicas=settings.ingress_replicas,
        max_queued_requests=settings.ingress_max_queued_requests,
        backpressure_config=backpressure,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        user_config=asdict(settings.limits()),
    )
    token = settings.auth_token or os.environ.get(TOKEN_ENV) or None
    return ingress.bind(model_app, token, settings.connection_limits())
