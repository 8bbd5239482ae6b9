"""The model deployment of the grounding endpoint: VG-LAW behind ``@serve.batch``.

The ingress decodes and letterboxes each image, so what reaches this replica is a small uint8 canvas
(``S x S x 3``) with its :class:`~vglaw.geometry.Letterbox`; the replica (the one that may own a GPU) only
runs the model, maps the box and mask back to the original image and encodes the mask. Requests that arrive
while a batch runs queue up and form the next batch.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray import serve
from ray.serve import metrics

from pipelines.tracking.registry import model_identity, resolved_model
from vglaw import Grounding, Predictor
from vglaw.geometry import Letterbox
from vglaw.rle import encode_mask
from vglaw.transforms import to_uint8_tensor

__all__ = [
    "MODEL_DEPLOYMENT",
    "BatchSettings",
    "GroundingItem",
    "GroundingModel",
    "GroundingOutcome",
    "ItemError",
    "mask_payload",
]

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "GroundingModel"
MASK_FORMATS = ("rle", "png")
# Batch-size buckets (each counts the batches of at most that many requests), up to the 256 an ingress replica
# takes at once; a batch cannot exceed the replica's max_ongoing_requests (64 by default).
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass(frozen=True)
class GroundingItem:
    """One request as the model replica receives it.

    Attributes:
        canvas: uint8 ``[S, S, 3]``, the image letterboxed onto the model's input canvas.
        letterbox: How the original image maps onto ``canvas``.
        expression: The referring expression (non-empty).
        return_mask: Whether to compute and return the mask.
        mask_format: ``"rle"`` (COCO compressed RLE) or ``"png"`` (base64 1-bit PNG).
        threshold: Mask probability threshold; None for the deployment's.
    """

    canvas: np.ndarray
    letterbox: Letterbox
    expression: str
    return_mask: bool = True
    mask_format: str = "rle"
    threshold: float | None = None


@dataclass(frozen=True)
class ItemError:
    """Why one item of a batch got no answer (the other items of its batch are unaffected)."""

    status: int
    code: str
    message: str


@dataclass
class GroundingOutcome:
    """The replica's answer for one item: a grounding, or an :class:`ItemError`.

    Times are in milliseconds: ``queue_ms`` waiting for the batch to start, ``inference_ms`` the batch's forward
    pass with the mapping back to original pixels, ``postprocess_ms`` this item's mask encoding.
    """

    box: list[float] | None = None  # [x0, y0, x1, y1] in original pixels
    box_normalized: list[float] | None = None
    mask: dict[str, Any] | None = None  # {"format", "size": [h, w], "counts" | "data"}
    mask_area: int | None = None
    threshold: float | None = None  # the mask threshold applied
    truncated: bool = False
    batch_size: int = 0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0
    error: ItemError | None = None


@dataclass(frozen=True)
class BatchSettings:
    """Runtime settings of the model deployment, set through its ``user_config``.

    Attributes:
        max_batch_size: Most requests per forward pass.
        batch_wait_timeout_s: How long a batch waits to fill once its first request arrived.
        mask_threshold: Default mask probability threshold; None keeps the model's.
    """

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    mask_threshold: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.batch_wait_timeout_s, (int, float)) or not 0 <= self.batch_wait_timeout_s <= 10:
            raise ValueError(f"batch_wait_timeout_s must be in [0, 10] s, got {self.batch_wait_timeout_s!r}")
        if self.mask_threshold is not None and not 0 <= self.mask_threshold <= 1:
            raise ValueError(f"mask_threshold must be in [0, 1], got {self.mask_threshold!r}")

    @classmethod
    def from_user_config(cls, config: Mapping[str, Any] | None) -> BatchSettings:
        """Settings from a ``user_config`` mapping; unknown keys are an error (a typo must not pass silently)."""
        config = dict(config or {})
        unknown = sorted(set(config) - {"max_batch_size", "batch_wait_timeout_s", "mask_threshold"})
        if unknown:
            raise ValueError(f"unknown {MODEL_DEPLOYMENT} user_config keys {unknown}")
        return cls(**config)


def mask_payload(mask: np.ndarray, mask_format: str) -> dict[str, Any]:
    """A bool ``[h, w]`` mask as ``{"format": "rle", "size", "counts"}`` or ``{"format": "png", "size", "data"}``.

    RLE is COCO's compressed RLE (column-major, ``pycocotools.mask.decode`` reads it back); PNG is a 1-bit
    image, base64-encoded, which a browser can draw directly.
    """
    height, width = mask.shape
    if mask_format == "rle":
        return {"format": "rle", **encode_mask(mask, text=True)}
    if mask_format == "png":
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(bool)).save(buffer, format="PNG", optimize=False)
        return {"format": "png", "size": [height, width], "data": base64.b64encode(buffer.getvalue()).decode()}
    raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")


@serve.deployment(
    name=MODEL_DEPLOYMENT,
    max_ongoing_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=60,
    ray_actor_options={"num_cpus": 1},
)
class GroundingModel:
    """Batched VG-LAW inference through :class:`vglaw.Predictor`.

    Args:
        model: A model directory or an MLflow URI (``models:/name@alias``, ``models:/name/N``, ``runs:/...``).
        device: ``"auto"`` (CUDA when the replica has a GPU), ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"`` or ``"bf16"`` (autocast); None: bf16 on CUDA, fp32 on the CPU.
    """

    def __init__(self, model: str, device: str = "auto", precision: str | None = None) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        with resolved_model(model) as directory:  # in memory from here: a registry model's download is removed
            self.predictor = Predictor.from_pretrained(directory, device=device, precision=precision)
            self.identity = model_identity(model, directory)
        self.model_threshold = self.predictor.mask_threshold
        self.settings = BatchSettings()
        # One forward at a time: the batch runs in a worker thread while health probes may run in another.
        self._forward_lock = threading.Lock()
        self._failure: str | None = None
        self._stats: Counter[str] = Counter()
        self._batch_sizes: Counter[int] = Counter()
        # The Serve metric beside the counters that stats() reports (docs/api.md, "Metrics").
        self._batch_size_metric = metrics.Histogram(
            "vglaw_batch_size",
            description="requests per forward pass of the model replica",
            boundaries=BATCH_SIZE_BOUNDARIES,
        )
        self._probe()  # fail at start-up, not on the first request, if the model cannot run

    # ---- configuration and health -----------------------------------------------------------------

    def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Applies ``user_config`` (:class:`BatchSettings`) at start and whenever it changes."""
        self.settings = BatchSettings.from_user_config(user_config)
        self._ground_batch.set_max_batch_size(self.settings.max_batch_size)
        self._ground_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        threshold = self.settings.mask_threshold
        self.predictor.mask_threshold = self.model_threshold if threshold is None else threshold

    def _probe(self) -> None:
        """One forward on a blank canvas; raises if the model cannot produce finite outputs."""
        size = self.predictor.image_size
        canvas = torch.zeros(1, 3, size, size, dtype=torch.uint8)
        with self._forward_lock:
            raw = self.predictor.predict_canvas(canvas, ["probe"])
        for out in (raw.boxes, raw.mask_probs):
            if out is not None and not bool(torch.isfinite(out).all()):
                raise RuntimeError("the model produced non-finite outputs on the probe input")

    async def check_health(self) -> None:
        """Serve's health check: fails while the model cannot run, so that Serve replaces the replica.

        A failure seen while serving is re-checked with a probe forward: the replica recovers if the probe
        passes (the failure was one input's), and is reported unhealthy if it does not.
        """
        if self._failure is None:
            return
        try:
            await asyncio.to_thread(self._probe)
        except Exception as err:
            self._failure = f"{type(err).__name__}: {err}"
            raise RuntimeError(f"model unusable: {self._failure}") from err
        self._failure = None

    # ---- serving ----------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The served model and the batching settings."""
        return {
            **asdict(self.identity),
            "device": str(self.predictor.device),
            "precision": self.predictor.precision,
            "torch_threads": torch.get_num_threads(),
            "mask_threshold": self.predictor.mask_threshold,
            "batching": asdict(self.settings),
        }

    def stats(self) -> dict[str, Any]:
        """Counters of this replica: requests, batches, batch sizes seen, failed items."""
        context = serve.get_replica_context()
        return {
            "replica": context.replica_id.unique_id,
            "requests": self._stats["requests"],
            "batches": self._stats["batches"],
            "failed_items": self._stats["failed_items"],
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
            "max_batch_size_seen": max(self._batch_sizes, default=0),
            "healthy": self._failure is None,
        }

    async def ground(self, item: GroundingItem) -> GroundingOutcome:
        """Grounds one item; concurrent calls are batched together."""
        return await self._ground_batch((item, time.perf_counter()))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _ground_batch(self, queued: list[tuple[Any, float]]) -> list[GroundingOutcome]:
        # The forward pass runs in a worker thread so that the event loop keeps accepting requests, which
        # then form the next batch, and keeps answering health checks.
        return await asyncio.to_thread(self._run_batch, queued)

    def _run_batch(self, queued: list[tuple[Any, float]]) -> list[GroundingOutcome]:
        start = time.perf_counter()
        batch_size = len(queued)
        self._stats["requests"] += batch_size
        self._stats["batches"] += 1
        self._batch_sizes[batch_size] += 1
        self._batch_size_metric.observe(batch_size)
        outcomes: list[GroundingOutcome | None] = [None] * batch_size
        valid: list[int] = []
        for i, (item, _) in enumerate(queued):
            problem = self._check_item(item)
            if problem is None:
                valid.append(i)
            else:
                outcomes[i] = GroundingOutcome(error=problem)
        results = self._forward([queued[i][0] for i in valid]) if valid else []
        inference_ms = (time.perf_counter() - start) * 1000
        for i, result in zip(valid, results):
            outcomes[i] = (
                GroundingOutcome(error=result) if isinstance(result, ItemError) else self._finish(queued[i][0], result)
            )
        for i, (_, arrived) in enumerate(queued):
            outcome = outcomes[i]
            assert outcome is not None
            outcome.batch_size = batch_size
            outcome.queue_ms = (start - arrived) * 1000
            outcome.inference_ms = inference_ms
            if outcome.error is not None:
                self._stats["failed_items"] += 1
        return outcomes  # type: ignore[return-value]

    def _check_item(self, item: Any) -> ItemError | None:
        """Why ``item`` cannot be run, or None. The ingress validates requests; this guards other callers."""
        if not isinstance(item, GroundingItem):
            return ItemError(422, "invalid_item", f"expected a GroundingItem, got {type(item).__name__}")
        size = self.predictor.image_size
        canvas = item.canvas
        if not isinstance(canvas, np.ndarray) or canvas.dtype != np.uint8 or canvas.shape != (size, size, 3):
            shape = getattr(canvas, "shape", None)
            return ItemError(422, "invalid_item", f"canvas must be uint8 [{size}, {size}, 3], got {shape}")
        if not isinstance(item.letterbox, Letterbox) or item.letterbox.size != size:
            return ItemError(422, "invalid_item", f"letterbox must be a Letterbox onto a {size} canvas")
        if not isinstance(item.expression, str) or not item.expression.strip():
            return ItemError(422, "empty_expression", "the expression must be a non-empty string")
        if item.mask_format not in MASK_FORMATS:
            return ItemError(422, "invalid_item", f"mask_format must be one of {MASK_FORMATS}")
        if item.threshold is not None and not 0 <= item.threshold <= 1:
            return ItemError(422, "invalid_item", "threshold must be in [0, 1]")
        return None

    def _predict(self, items: list[GroundingItem]) -> list[Grounding]:
        canvases = torch.stack([to_uint8_tensor(item.canvas) for item in items])  # [B, 3, S, S]
        with self._forward_lock:
            return self.predictor.predict_letterboxed(
                canvases,
                [item.letterbox for item in items],
                [item.expression for item in items],
                return_mask=any(item.return_mask for item in items),
            )

    def _forward(self, items: list[GroundingItem]) -> list[Grounding | ItemError]:
        """The batch in one forward pass; if that fails, item by item, so that one bad item fails alone."""
        try:
            return list(self._predict(items))
        except Exception as err:
            logger.warning("batch of %d failed (%s: %s); retrying item by item", len(items), type(err).__name__, err)
            batch_error = err
        results: list[Grounding | ItemError] = []
        for item in items:
            try:
                results.extend(self._predict([item]))
            except Exception as err:
                logger.exception("inference failed for one item")
                results.append(ItemError(500, "inference_failed", f"inference failed: {type(err).__name__}: {err}"))
        if all(isinstance(r, ItemError) for r in results):
            self._recheck_model(batch_error)
        return results

    def _recheck_model(self, err: Exception) -> None:
        """After a failure of every item, a probe tells a bad input from a broken model (e.g. a lost GPU)."""
        try:
            self._probe()
        except Exception as probe_err:
            self._failure = f"{type(probe_err).__name__}: {probe_err} (after {type(err).__name__}: {err})"
            logger.error("model unusable: %s", self._failure)

    def _finish(self, item: GroundingItem, grounding: Grounding) -> GroundingOutcome:
        """Per-item threshold and mask encoding; an encoding failure fails this item only."""
        start = time.perf_counter()
        outcome = GroundingOutcome(
            box=None if grounding.box is None else [float(v) for v in grounding.box],
            box_normalized=None if grounding.box_normalized is None else [float(v) for v in grounding.box_normalized],
            truncated=bool(grounding.truncated),
            threshold=self.predictor.mask_threshold if item.threshold is None else item.threshold,
        )
        if item.return_mask and grounding.mask_probs is not None:
            mask = grounding.mask if item.threshold is None else grounding.mask_probs >= item.threshold  # bool [H, W]
            try:
                outcome.mask = mask_payload(mask, item.mask_format)
            except Exception as err:
                logger.exception("mask encoding failed")
                return GroundingOutcome(error=ItemError(500, "encoding_failed", f"mask encoding failed: {err}"))
            outcome.mask_area = int(mask.sum())
        outcome.postprocess_ms = (time.perf_counter() - start) * 1000
        return outcome
