"""Scoring predictions: per-expression results through :class:`vglaw.Predictor`, folded into metrics.

:func:`evaluate_rows` and :func:`accumulate` are pure (no Ray): a batch of Parquet rows in, per-row box IoU,
mask intersection / union and word counts out, folded into a :class:`vglaw.metrics.GroundingMetrics`. The
training loop calls them on its shard for validation and merges the metric states across workers; the
evaluation stage runs them in a Ray Data actor pool (:mod:`pipelines.evaluate.inference`).

A batch is a mapping of columns, as Ray Data hands it over with ``batch_format="numpy"`` (or as
``pyarrow.Table.to_pydict()`` gives it); a ``pyarrow.Table`` (``batch_format="pyarrow"``) and a list of row
dicts (``Table.to_pylist()``) are accepted too and converted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.data.parquet import decode_image, letterbox_of
from pipelines.data.schema import EVAL_COLUMNS
from vglaw import Predictor
from vglaw.geometry import xywh_to_xyxy
from vglaw.metrics import GroundingMetrics, box_iou_paired, mask_intersection_union, word_count
from vglaw.rle import decode_rle

__all__ = [
    "RESULT_COLUMNS",
    "accumulate",
    "columns_of",
    "concat_results",
    "evaluate_batches",
    "evaluate_rows",
    "sort_results",
]

# What evaluate_rows returns, one entry per row. NaN box IoU means "no REC branch", -1 mask counts "no RES branch".
RESULT_COLUMNS: tuple[str, ...] = (
    "ref_id",
    "ann_id",
    "image_id",
    "sent_id",
    "expression",
    "word_count",
    "truncated",
    "pred_box_xyxy",
    "gt_box_xyxy",
    "box_iou",
    "mask_intersection",
    "mask_union",
    "pred_mask_area",
)

Batch = Mapping[str, Any] | pa.Table | Sequence[Mapping[str, Any]]


def columns_of(batch: Batch) -> Mapping[str, Any]:
    """A batch in any accepted form as a mapping of columns."""
    if isinstance(batch, pa.Table):
        return batch.to_pydict()
    if isinstance(batch, Sequence):  # row dicts, e.g. Table.to_pylist()
        return {name: [row[name] for row in batch] for name in (batch[0] if batch else EVAL_COLUMNS)}
    return batch


def _row(columns: Mapping[str, Any], i: int, names: Sequence[str]) -> dict[str, Any]:
    return {name: columns[name][i] for name in names}


_LETTERBOX_COLUMNS = ("orig_width", "orig_height", "canvas_size", "resized_width", "resized_height", "pad_x", "pad_y")


def evaluate_rows(predictor: Predictor, batch: Batch, threshold: float | None = None) -> dict[str, np.ndarray]:
    """Predicts a batch of rows and scores each prediction against its ground truth, in original pixels.

    Args:
        predictor: The model to evaluate (its ``batch_size`` sets the forward-pass size).
        batch: Columns of the row schema (at least :data:`EVAL_COLUMNS`), e.g. a Ray Data ``numpy`` batch.
        threshold: Mask probability threshold; defaults to the predictor's (0.35).

    Returns:
        Columns :data:`RESULT_COLUMNS`, each with one entry per row: ids, ``expression``, ``word_count`` [N],
        ``truncated`` [N], ``pred_box_xyxy`` and ``gt_box_xyxy`` [N, 4] (original pixels; NaN without a box
        branch), ``box_iou`` [N] (NaN without a box branch), ``mask_intersection``, ``mask_union`` and
        ``pred_mask_area`` [N] (pixels at the original resolution; -1 without a mask branch).
    """
    columns = columns_of(batch)
    n = len(columns["expression"])
    expressions = [str(e) for e in columns["expression"]]
    letterboxes = [letterbox_of(_row(columns, i, _LETTERBOX_COLUMNS)) for i in range(n)]
    canvases = torch.from_numpy(np.stack([decode_image(columns["image"][i]) for i in range(n)])).permute(0, 3, 1, 2)
    gt_boxes = np.stack([xywh_to_xyxy(np.asarray(columns["box_xywh"][i], np.float64).reshape(4)) for i in range(n)])
    groundings = predictor.predict_letterboxed(canvases, letterboxes, expressions, threshold=threshold)

    pred_boxes = np.full((n, 4), np.nan)
    box_iou = np.full(n, np.nan)
    if n and groundings[0].box is not None:
        pred_boxes = np.asarray([g.box for g in groundings], np.float64)  # [N, 4]
        box_iou = box_iou_paired(pred_boxes, gt_boxes)
    inter = np.full(n, -1, np.int64)
    union = np.full(n, -1, np.int64)
    area = np.full(n, -1, np.int64)
    for i, g in enumerate(groundings):
        if g.mask is None:
            continue
        gt_mask = decode_rle(columns["mask_rle"][i], [int(v) for v in columns["mask_size"][i]])  # [H, W]
        if gt_mask.shape != g.mask.shape:
            raise ValueError(f"row {i}: mask_size {gt_mask.shape} differs from the image {g.mask.shape}")
        row_inter, row_union = mask_intersection_union(g.mask[None], gt_mask[None])
        inter[i], union[i], area[i] = int(row_inter[0]), int(row_union[0]), int(g.mask.sum())
    return {
        "ref_id": np.asarray(columns["ref_id"], np.int64).reshape(n),
        "ann_id": np.asarray(columns["ann_id"], np.int64).reshape(n),
        "image_id": np.asarray(columns["image_id"], np.int64).reshape(n),
        "sent_id": np.asarray(columns["sent_id"], np.int64).reshape(n),
        "expression": np.asarray(expressions, dtype=object).reshape(n),
        "word_count": np.asarray([word_count(e) for e in expressions], np.int64).reshape(n),
        "truncated": np.asarray([g.truncated for g in groundings], bool).reshape(n),
        "pred_box_xyxy": pred_boxes,
        "gt_box_xyxy": gt_boxes.reshape(n, 4),
        "box_iou": box_iou,
        "mask_intersection": inter,
        "mask_union": union,
        "pred_mask_area": area,
    }


def accumulate(metrics: GroundingMetrics, results: Mapping[str, np.ndarray]) -> GroundingMetrics:
    """Adds :func:`evaluate_rows` results to ``metrics`` (in place) and returns it.

    Branches the model lacks (NaN box IoU, -1 mask counts) are left out of the metrics.
    """
    words = np.asarray(results["word_count"], np.int64)
    if words.size == 0:
        return metrics
    ious = np.asarray(results["box_iou"], np.float64)
    inter = np.asarray(results["mask_intersection"], np.int64)
    union = np.asarray(results["mask_union"], np.int64)
    has_box = ~np.isnan(ious)
    has_mask = inter >= 0
    if (has_box.any() and not has_box.all()) or (has_mask.any() and not has_mask.all()):
        raise ValueError("results mix rows with and without a box or mask prediction")
    metrics.update(
        words,
        box_iou=ious if has_box.all() else None,
        mask_intersection=inter if has_mask.all() else None,
        mask_union=union if has_mask.all() else None,
    )
    return metrics


def evaluate_batches(
    predictor: Predictor, batches: Iterable[Batch], metrics: GroundingMetrics | None = None
) -> GroundingMetrics:
    """Evaluates an iterable of batches (e.g. a worker's validation shard) into one accumulator.

    Args:
        predictor: The model to evaluate.
        batches: Row batches, e.g. ``shard.iter_batches(batch_size=32, batch_format="numpy")``.
        metrics: Accumulator to add to; a default :class:`GroundingMetrics` when omitted.

    Returns:
        The accumulator. Merge its ``state_dict()`` across workers with ``GroundingMetrics.merged``.
    """
    metrics = GroundingMetrics() if metrics is None else metrics
    for batch in batches:
        accumulate(metrics, evaluate_rows(predictor, batch))
    return metrics


def concat_results(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenates result batches column by column (an empty list gives empty columns)."""
    if not parts:
        empty: dict[str, np.ndarray] = {name: np.zeros(0, np.int64) for name in RESULT_COLUMNS}
        empty.update(
            expression=np.zeros(0, object),
            truncated=np.zeros(0, bool),
            box_iou=np.zeros(0),
            pred_box_xyxy=np.zeros((0, 4)),
            gt_box_xyxy=np.zeros((0, 4)),
        )
        return empty
    return {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in RESULT_COLUMNS}


def sort_results(results: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Results in a canonical order, by ``(ref_id, sent_id)``, whatever order the actors returned them in."""
    order = np.lexsort((np.asarray(results["sent_id"]), np.asarray(results["ref_id"])))
    return {name: np.asarray(values)[order] for name, values in results.items()}
