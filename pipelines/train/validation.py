"""Validation inside the training loop: every worker scores its slice of the split, states merge exactly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import torch.distributed as dist
from PIL import Image

from pipelines.evaluate.scoring import evaluate_batches
from vglaw import ExpressionTokenizer, Predictor
from vglaw.metrics import GroundingMetrics
from vglaw.model import VGLAW
from vglaw.precision import Precision


def rows_of_rank(data: Any, rank: int, world: int, batch_size: int) -> Iterator[pa.Table]:
    """Batches of the rows ``i`` with ``i % world == rank`` from a Ray Data iterator over the whole split."""
    index = 0
    for batch in data.iter_batches(batch_size=batch_size * world, batch_format="pyarrow"):
        mine = [offset for offset in range(batch.num_rows) if (index + offset) % world == rank]
        index += batch.num_rows
        if mine:
            yield batch.take(mine)


def validate_on_worker(
    model: VGLAW,
    tokenizer: ExpressionTokenizer,
    data: Any,
    rank: int,
    world: int,
    batch_size: int,
    precision: Precision | None = None,
) -> dict[str, float]:
    """Score this worker's share of the split, then merge every worker's state: all ranks get the totals."""
    was_training = model.training
    predictor = Predictor(model, tokenizer, batch_size=batch_size, precision=precision)
    metrics = GroundingMetrics()
    evaluate_batches(predictor, rows_of_rank(data, rank, world, batch_size), metrics)
    model.train(was_training)
    return GroundingMetrics.merged(all_gather_objects(metrics.state_dict())).compute()


def first_rows(data: Any, count: int) -> list[dict[str, Any]]:
    """The split's first ``count`` rows as dicts."""
    for batch in data.iter_batches(batch_size=count, batch_format="pyarrow"):
        return batch.to_pylist()[:count]
    return []


def overlay_figure(model: VGLAW, tokenizer: ExpressionTokenizer, data: Any, count: int) -> Image.Image:
    """Predictions for the split's first rows drawn next to the truth, as one grid image."""
    from pipelines.evaluate.report import overlay_examples

    was_training = model.training
    predictor = Predictor(model, tokenizer)
    grid = overlay_examples(predictor, first_rows(data, count), max_items=count)
    model.train(was_training)
    return grid


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (just ``[value]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
