"""Evaluation: per-expression results through :class:`vglaw.Predictor`, and Ray Data batch inference over a split.

Two layers:

* :func:`evaluate_rows` and :func:`accumulate` are pure (no Ray): a batch of Parquet rows in, per-row box IoU,
  mask intersection / union and word counts out, folded into a :class:`vglaw.metrics.GroundingMetrics`. The
  training loop calls them on its shard for validation and merges the metric states across workers.
* :func:`evaluate_split` runs the same function in a Ray Data actor pool (``map_batches`` with a callable
  class that builds the Predictor in ``__init__``), collects the per-row results and computes the metrics from
  them. The metrics depend only on the set of rows, not on their order or on the number of actors.

A batch is a mapping of columns, as Ray Data hands it over with ``batch_format="numpy"`` (or as
``pyarrow.Table.to_pydict()`` gives it); a ``pyarrow.Table`` (``batch_format="pyarrow"``) and a list of row
dicts (``Table.to_pylist()``) are accepted too and converted.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.coco_masks import decode_rle
from pipelines.dataset_io import decode_image, letterbox_of, split_files
from pipelines.manifest import read_manifest
from vglaw import Predictor
from vglaw.geometry import xywh_to_xyxy
from vglaw.metrics import GroundingMetrics, box_iou_paired, mask_intersection_union, word_count

__all__ = [
    "EVAL_COLUMNS",
    "RESULT_COLUMNS",
    "GroundingEvaluator",
    "SplitEvaluation",
    "accumulate",
    "columns_of",
    "concat_results",
    "evaluate_batches",
    "evaluate_rows",
    "evaluate_split",
    "evaluate_splits",
    "pack_model_dir",
    "plan_chunks",
    "read_chunk",
    "sort_results",
]

# The Parquet columns evaluation reads (the canvas-resolution mask is not needed).
EVAL_COLUMNS: tuple[str, ...] = (
    "ref_id",
    "ann_id",
    "image_id",
    "sent_id",
    "expression",
    "image",
    "orig_width",
    "orig_height",
    "canvas_size",
    "resized_width",
    "resized_height",
    "pad_x",
    "pad_y",
    "box_xywh",
    "mask_rle",
    "mask_size",
)

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


def _columns(batch: Batch) -> Mapping[str, Any]:
    if isinstance(batch, pa.Table):
        return batch.to_pydict()
    if isinstance(batch, Sequence):  # row dicts, e.g. Table.to_pylist()
        return {name: [row[name] for row in batch] for name in (batch[0] if batch else EVAL_COLUMNS)}
    return batch


def columns_of(batch: Batch) -> Mapping[str, Any]:
    """A batch in any accepted form as a mapping of columns."""
    return _columns(batch)


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
    columns = _columns(batch)
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


# --------------------------------------------------------------------------------------------------
# Ray Data batch inference
# --------------------------------------------------------------------------------------------------

# NOTE: why the actors read their rows from a plan of (file, start, stop) chunks instead of receiving batches
# from ``read_parquet``: a row's prediction depends, in its last float bits, on the other rows of its forward
# pass (text padding length, GEMM shapes), and the batches Ray Data cuts from streamed blocks depend on
# scheduling. Cutting the batches from fixed chunks makes every forward pass, hence every metric, identical
# for any number of actors. The plan is small and materialised, so no read task competes with the actors for
# CPUs (with actors on every CPU, a streamed read would wait forever).


def pack_model_dir(model_dir: str | os.PathLike[str]) -> dict[str, bytes]:
    """The files of a model directory as ``name -> bytes``, to ship through the object store.

    NOTE: shipping the bytes, rather than a path, lets actors on other nodes load a model that lives only on
    the driver (a local directory, or one downloaded from a local MLflow store).
    """
    files = {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir()) if p.is_file()}
    if "config.json" not in files:
        raise FileNotFoundError(f"{model_dir} is not a VG-LAW model directory (no config.json)")
    return files


def plan_chunks(
    data_dir: str | os.PathLike[str], split: str, rows_per_chunk: int, limit: int | None = None
) -> list[dict[str, Any]]:
    """Cuts a split into ``{"file", "start", "stop"}`` row ranges, in file order.

    Args:
        data_dir: Output folder of the preprocessing job.
        split: Split name.
        rows_per_chunk: Rows per range (the last range of a file may be shorter).
        limit: Plan only the first ``limit`` rows.
    """
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    counts = read_manifest(data_dir)["splits"][split]["files"]
    remaining = math.inf if limit is None else limit
    plan = []
    for path in split_files(data_dir, split):
        rows = min(int(counts[path.name]), remaining)
        remaining -= rows
        plan += [
            {"file": str(path.absolute()), "start": s, "stop": min(s + rows_per_chunk, rows)}
            for s in range(0, int(rows), rows_per_chunk)
        ]
    return plan


def read_chunk(file: str, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of one Parquet file, :data:`EVAL_COLUMNS` only."""
    return pq.read_table(file, columns=list(EVAL_COLUMNS)).slice(start, stop - start)


class GroundingEvaluator:
    """The ``map_batches`` callable: builds a Predictor once per actor, then scores planned chunks.

    Args:
        model_files: A one-element list holding the object ref of :func:`pack_model_dir`'s output (wrapped in
            a list so that Ray hands the ref over instead of resolving it in the caller).
        batch_size: Expressions per forward pass; a chunk is cut into batches of this size from its start.
        mask_threshold: Mask probability threshold; None for the model's.
        device: ``"cpu"``, ``"cuda"`` or None for CUDA when this actor sees a GPU.
        torch_threads: Intra-op threads (match the actor's CPUs so actors do not oversubscribe the node).
        precision: ``"fp32"`` or ``"bf16"`` (autocast); None for the device's default.
    """

    def __init__(
        self,
        model_files: list[Any],
        batch_size: int = 16,
        mask_threshold: float | None = None,
        device: str | None = None,
        torch_threads: int = 1,
        precision: str | None = None,
    ) -> None:
        import ray

        torch.set_num_threads(max(1, torch_threads))
        files: dict[str, bytes] = ray.get(model_files[0])
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with tempfile.TemporaryDirectory(prefix="vglaw-eval-") as tmp:
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            self.predictor = Predictor.from_pretrained(tmp, device=device, precision=precision)
        self.batch_size = batch_size
        self.predictor.batch_size = batch_size
        self.mask_threshold = mask_threshold

    def __call__(self, plan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for split, file, start, stop in zip(plan["split"], plan["file"], plan["start"], plan["stop"]):
            began = time.perf_counter()
            table = read_chunk(str(file), int(start), int(stop))
            chunk = [
                evaluate_rows(self.predictor, table.slice(offset, self.batch_size), threshold=self.mask_threshold)
                for offset in range(0, table.num_rows, self.batch_size)
            ]
            result = concat_results(chunk)
            # NOTE: the chunk's actor time, spread over its rows, so each split's share can be summed later.
            n = len(result["word_count"])
            result["split"] = np.full(n, str(split), dtype=object)
            result["actor_seconds"] = np.full(n, (time.perf_counter() - began) / max(1, n))
            parts.append(result)
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}


@dataclass
class SplitEvaluation:
    """The outcome of :func:`evaluate_splits` for one split.

    Attributes:
        split: The split's name.
        results: Per-row results (:data:`RESULT_COLUMNS`), sorted by ``(ref_id, sent_id)``.
        metrics: The accumulator over all rows.
        seconds: Actor time spent on this split (model loading and Ray overhead excluded).
        settings: The arguments that shaped the run (actors, batch size, threshold, ...).
    """

    split: str
    results: dict[str, np.ndarray]
    metrics: GroundingMetrics
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Rows evaluated."""
        return len(self.results["word_count"])


def evaluate_splits(
    model_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    splits: Sequence[str],
    num_actors: int = 1,
    batch_size: int = 16,
    mask_threshold: float | None = None,
    num_cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float = 0.0,
    precision: str | None = None,
    iou_threshold: float = 0.5,
    length_edges: Sequence[int] = (5, 7, 10),
    batches_per_chunk: int = 4,
    limit: int | None = None,
) -> dict[str, SplitEvaluation]:
    """Batch inference over several splits with one Ray Data actor pool; Ray must be initialised.

    Args:
        model_dir: A local model directory (see :func:`pipelines.tracking.resolve_model` for registry URIs).
        data_dir: Output folder of the preprocessing job (on storage every node can read).
        splits: Splits to evaluate.
        num_actors: Size of the actor pool (capped by the number of planned chunks).
        batch_size: Expressions per forward pass.
        mask_threshold: Mask probability threshold; None for the model's (0.35).
        num_cpus_per_actor: CPUs reserved per actor (also its torch thread count).
        num_gpus_per_actor: GPUs per actor; 0 runs on the CPU.
        precision: ``"fp32"`` or ``"bf16"`` (autocast); None: bf16 on GPUs, fp32 on the CPU.
        iou_threshold: Box IoU counted as a hit for ``prec@<t>``.
        length_edges: Expression-length buckets, as :class:`GroundingMetrics` takes them.
        batches_per_chunk: Batches per planned chunk (the unit of work an actor takes).
        limit: Evaluate only the first ``limit`` rows of each split (smoke tests).

    Returns:
        ``{split: SplitEvaluation}`` in the order of ``splits``. The metrics are exact and do not depend on
        ``num_actors``.
    """
    import ray

    if num_actors < 1 or batch_size < 1 or batches_per_chunk < 1:
        raise ValueError("num_actors, batch_size and batches_per_chunk must be >= 1")
    if len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct, got {list(splits)}")
    plan = [
        {"split": split, **chunk}
        for split in splits
        for chunk in plan_chunks(data_dir, split, batch_size * batches_per_chunk, limit)
    ]
    parts = []
    if plan:
        ref = ray.put(pack_model_dir(model_dir))
        scored = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
            GroundingEvaluator,
            batch_size=1,
            batch_format="numpy",
            fn_constructor_kwargs={
                "model_files": [ref],
                "batch_size": batch_size,
                "mask_threshold": mask_threshold,
                "device": "cuda" if num_gpus_per_actor > 0 else "cpu",
                "torch_threads": max(1, int(num_cpus_per_actor)),
                "precision": precision,
            },
            compute=ray.data.ActorPoolStrategy(size=min(num_actors, len(plan))),
            num_cpus=num_cpus_per_actor,
            num_gpus=num_gpus_per_actor,
        )
        parts = [b for b in scored.iter_batches(batch_size=None, batch_format="numpy") if len(b)]
    settings = {
        "num_actors": num_actors,
        "batch_size": batch_size,
        "batches_per_chunk": batches_per_chunk,
        "mask_threshold": mask_threshold,
        "num_cpus_per_actor": num_cpus_per_actor,
        "num_gpus_per_actor": num_gpus_per_actor,
        "precision": precision,
        "iou_threshold": iou_threshold,
        "length_edges": list(length_edges),
        "limit": limit,
    }
    split_of = np.concatenate([np.asarray(p["split"]) for p in parts]) if parts else np.zeros(0, object)
    seconds = np.concatenate([np.asarray(p["actor_seconds"]) for p in parts]) if parts else np.zeros(0)
    everything = concat_results(parts)
    out = {}
    for split in splits:
        mine = split_of == split
        results = sort_results({name: values[mine] for name, values in everything.items()})
        metrics = accumulate(GroundingMetrics(iou_threshold, length_edges), results)
        out[split] = SplitEvaluation(split, results, metrics, float(seconds[mine].sum()), dict(settings))
    return out


def evaluate_split(
    model_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str], split: str, **kwargs: Any
) -> SplitEvaluation:
    """:func:`evaluate_splits` for one split (same keyword arguments)."""
    return evaluate_splits(model_dir, data_dir, [split], **kwargs)[split]
