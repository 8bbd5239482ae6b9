"""Ray Data batch inference over whole splits: an actor pool of Predictors scoring planned row chunks.

The per-row scoring is :func:`pipelines.evaluate.scoring.evaluate_rows`; this module only decides which rows
each forward pass sees and where it runs. The metrics depend only on the set of rows, not on their order or on
the number of actors.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.data.manifest import read_manifest
from pipelines.data.parquet import split_files
from pipelines.data.schema import EVAL_COLUMNS
from pipelines.evaluate.scoring import accumulate, concat_results, evaluate_rows, sort_results
from vglaw import Predictor
from vglaw.checkpoint import CONFIG_FILE
from vglaw.metrics import GroundingMetrics

__all__ = ["GroundingEvaluator", "SplitEvaluation", "evaluate_splits", "pack_model_dir", "plan_chunks", "read_chunk"]


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
    if CONFIG_FILE not in files:
        raise FileNotFoundError(f"{model_dir} is not a VG-LAW model directory (no {CONFIG_FILE})")
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
