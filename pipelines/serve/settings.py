"""The settings of the grounding application, declared once: :func:`pipelines.serve.app.build_app` takes them,
Ray Serve validates ``serve run ... key=value`` and a Serve config's ``args:`` into them, and ``jobs.serve``
generates its command-line flags from them.

Values arrive as text from ``serve run`` (``max_replicas=4``, ``mask_threshold=none``) and typed from YAML or
Python; both pass the same validators. The checks that the deployments' runtime configs share live in their
own classes (:class:`~pipelines.serve.model.BatchSettings`, :class:`~pipelines.serve.requests.RequestLimits`,
:class:`ConnectionLimits`) and run here on the initial values.

docs/api.md ("Load, autoscaling and deadlines") gives the reasons for the autoscaling and load-shedding defaults.
"""

import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipelines.serve.model import BatchSettings
from pipelines.serve.requests import RequestLimits
from vglaw.precision import PRECISIONS, check_precision

__all__ = ["NONE_WORDS", "TOKEN_ENV", "ConnectionLimits", "ServeSettings", "optional_base"]

TOKEN_ENV = "VGLAW_SERVE_TOKEN"
# What ``serve run key=none`` (or an empty value) means for a setting that may be None.
NONE_WORDS = frozenset({"", "none", "null"})
PROXY_GRACE_S = 5.0  # Ray's proxy deadline is the ingress's request_timeout_s plus this


def optional_base(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(annotation, False)``."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return rest[0], True
    return annotation, False


@dataclass(frozen=True)
class ConnectionLimits:
    """What the ingress allows one HTTP request besides its content (:mod:`pipelines.serve.requests` checks that).

    Attributes:
        request_timeout_s: Seconds the ingress gives a request from its headers to its answer (body, decoding,
            queue, forward pass); later it answers 504 ``request_timeout``. None: no deadline.
        body_timeout_s: Seconds the ingress waits for the whole request body; a slower upload is answered 408.
        max_header_bytes: Largest total size of the request headers (names, values and framing); above it 431.
            Ray's HTTP proxy (uvicorn with httptools) has no header limit of its own.
        retry_after_s: The ``Retry-After`` seconds of a 503 (a full model queue, a lost replica).
    """

    request_timeout_s: float | None = 60.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 16 * 1024
    retry_after_s: int = 2

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "body_timeout_s"):
            timeout = getattr(self, name)
            if timeout is None and name == "request_timeout_s":
                continue
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, got {timeout!r}")
        for name, low in (("max_header_bytes", 1), ("retry_after_s", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class ServeSettings(BaseModel):
    """Everything :func:`~pipelines.serve.app.build_app` takes (``serve run ... key=value``, a Serve config's
    ``args``, or the flags of ``python -m jobs.serve``).

    The model reference is passed on as given; each model replica resolves it (an MLflow download, or the
    model folder inside a directory) when it starts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    model: str = Field(
        description="model directory (from vglaw.save_pretrained) or MLflow URI: models:/name@alias, "
        "models:/name/<version>, runs:/<run_id>/<path>",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="model device; auto: CUDA when the replica has a GPU"
    )
    precision: str | None = Field(
        None,
        description=f"forward-pass precision, one of {', '.join(PRECISIONS)} (bf16 through autocast); "
        "none: bf16 on CUDA, fp32 on the CPU",
    )
    min_replicas: int = Field(
        1, ge=0, description="fewest model replicas; equal to max_replicas: exactly that many (no autoscaling)"
    )
    max_replicas: int = Field(1, ge=1, description="most model replicas; above min_replicas the model autoscales")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="autoscaling target of ongoing (running and queued) requests per model replica"
    )
    upscale_delay_s: float = Field(
        10.0, ge=0, description="seconds the load must stay above the target before a model replica is added"
    )
    downscale_delay_s: float = Field(
        300.0, ge=0, description="seconds the load must stay below the target before a model replica is removed"
    )
    look_back_period_s: float = Field(
        20.0, gt=0, description="seconds over which autoscaling averages the ongoing requests"
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests one model replica holds at once (also caps the batch size)"
    )
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="requests each ingress replica queues for the model while every model replica is full; "
        "beyond it 503 overloaded with Retry-After; -1: no limit",
    )
    num_cpus: float = Field(
        1.0,
        ge=0,
        description="CPUs reserved per model replica (also its torch threads)",
        # NOTE: the plain --num-cpus is the local Ray's CPU count, as it is for the other jobs.
        json_schema_extra={"flag": "--num-cpus-per-replica"},
    )
    num_gpus: float = Field(
        0.0,
        ge=0,
        description="GPUs per model replica; 0 runs it on the CPU",
        json_schema_extra={"flag": "--num-gpus-per-replica"},
    )
    ingress_replicas: int = Field(
        1, ge=1, description="HTTP ingress replicas (they decode images: scale them with the request rate)"
    )
    ingress_num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per ingress replica")
    ingress_max_queued_requests: int = Field(
        256,
        ge=-1,
        description="requests each HTTP proxy queues while every ingress replica is full; beyond it Ray's proxy "
        "answers 503 (plain text) with Retry-After; -1: no limit",
    )
    request_timeout_s: float | None = Field(
        ConnectionLimits.request_timeout_s,
        gt=0,
        description="seconds the ingress gives a request from its headers to its answer, then 504 "
        "request_timeout; jobs.serve also starts Ray's proxy with this plus PROXY_GRACE_S as the bound of last "
        "resort; none: no deadline",
    )
    body_timeout_s: float = Field(
        ConnectionLimits.body_timeout_s,
        description="seconds the ingress waits for a request body before answering 408 (below request_timeout_s)",
    )
    max_header_bytes: int = Field(
        ConnectionLimits.max_header_bytes, description="largest total size of a request's headers; above it 431"
    )
    retry_after_s: int = Field(
        ConnectionLimits.retry_after_s, description="Retry-After seconds sent with 503 answers (overload, lost replica)"
    )
    max_batch_size: int = Field(
        BatchSettings.max_batch_size, description="most requests per forward pass (the model's initial user_config)"
    )
    batch_wait_timeout_s: float = Field(
        BatchSettings.batch_wait_timeout_s,
        description="seconds a batch waits to fill, in [0, 10] (the model's initial user_config)",
    )
    mask_threshold: float | None = Field(
        BatchSettings.mask_threshold,
        description="mask probability threshold in [0, 1]; none: the model's (the model's initial user_config)",
    )
    max_image_bytes: int = Field(
        RequestLimits.max_image_bytes,
        description="largest encoded image in bytes (the ingress's initial user_config)",
    )
    max_image_pixels: int = Field(
        RequestLimits.max_image_pixels,
        description="largest width * height, read from the header before decoding (the ingress's initial user_config)",
    )
    max_expression_chars: int = Field(
        RequestLimits.max_expression_chars,
        description="longest expression in characters (the ingress's initial user_config)",
    )
    auth_token: str | None = Field(
        None,
        description=f"bearer token required on /v1/*; none: ${TOKEN_ENV} (prefer that: args and flags show up "
        "in process lists and Serve configs)",
    )

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # NOTE: before pydantic's own extra="forbid", for one message that also lists what is accepted.
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown serve args {unknown}; accepted: {sorted(cls.model_fields)}")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _text_and_bools(cls, value: Any, info: ValidationInfo) -> Any:
        base, optional = optional_base(cls.model_fields[info.field_name].annotation)
        if optional and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)):
            return None
        # pydantic's lax mode reads True as 1; a bool where a number belongs is a mistake in a config.
        if isinstance(value, bool) and base is not bool:
            raise ValueError(f"{info.field_name} must not be a bool, got {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _model_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model is required: a model directory or models:/name@alias")
        return value

    @field_validator("precision")
    @classmethod
    def _precision_known(cls, value: str | None) -> str | None:
        check_precision(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ServeSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"need min_replicas <= max_replicas, got {self.min_replicas} > {self.max_replicas}")
        for name in ("max_queued_requests", "ingress_max_queued_requests"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be -1 (no limit) or >= 1, got 0")
        if self.request_timeout_s is not None and self.body_timeout_s >= self.request_timeout_s:
            # NOTE: else the proxy's plain-text 408 ends a slow upload before the ingress's JSON one.
            raise ValueError(
                f"need body_timeout_s < request_timeout_s, got {self.body_timeout_s} >= {self.request_timeout_s}"
            )
        self.batch_settings()
        self.limits()
        self.connection_limits()
        return self

    def model_path(self) -> Path | None:
        """``model`` as a local path; None when it is an MLflow (``models:/``, ``runs:/``) or other artifact URI."""
        if "://" in self.model or self.model.startswith(("models:/", "runs:/")):
            return None
        return Path(self.model)

    def batch_settings(self) -> BatchSettings:
        """The model deployment's initial ``user_config``."""
        return BatchSettings(self.max_batch_size, self.batch_wait_timeout_s, self.mask_threshold)

    def limits(self) -> RequestLimits:
        """The ingress's initial limits."""
        return RequestLimits(self.max_image_bytes, self.max_image_pixels, self.max_expression_chars)

    def connection_limits(self) -> ConnectionLimits:
        """The ingress's body deadline, header limit and Retry-After."""
        return ConnectionLimits(self.request_timeout_s, self.body_timeout_s, self.max_header_bytes, self.retry_after_s)

    def proxy_request_timeout_s(self) -> float | None:
        """The deadline for Ray's HTTP proxy: the ingress's plus :data:`PROXY_GRACE_S`, so that the ingress's
        JSON 504 comes first and the proxy's plain-text 408 only bounds waits the ingress does not see."""
        return None if self.request_timeout_s is None else self.request_timeout_s + PROXY_GRACE_S

    def autoscaling_config(self) -> dict[str, Any] | None:
        """The model deployment's ``autoscaling_config``; None for a fixed number of replicas."""
        if self.max_replicas == self.min_replicas:
            return None
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }
