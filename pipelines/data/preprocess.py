"""Ray Data preprocessing: a REFER dataset -> sharded Parquet per split + ``manifest.json``.

Shape of the job::

    driver: REFER reader -> ImageTasks (one per image and split) -> chunks of one split each, shrinking
            towards the end so that the workers finish together
    Ray Data, one execution for every split:
        from_items(chunks) -> map_batches(encode) -> write_datasink(<stage>/<split>/part-*.parquet)
    driver: collect skips, check the accounting, write manifest.json, swap <stage> into <out>

Everything goes into a hidden staging folder beside ``out`` first; only a complete output (manifest
included) is renamed into place, so a reader never sees a half-written mix. Each encoder task writes what
it skipped and the Ray node it ran on beside its Parquet files (``<stage>/_chunks/``), and the driver checks that
for every split ``rows written + expressions skipped == expressions expected``: nothing vanishes silently. The
manifest counts the images each node encoded (``encoded_by_node``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data.encode import (
    IMAGE_FORMATS,
    ImageTask,
    Skip,
    build_image_tasks,
    chunk_by_split,
    encode_image_task,
    pack_tasks,
    rows_to_table,
    unpack_tasks,
)
from pipelines.data.manifest import code_version, parquet_file_rows, write_manifest
from pipelines.data.refer import ReferDataset, ReferProblem, ReferSource
from pipelines.data.schema import COLUMN_DOCS, SCHEMA_VERSION
from pipelines.runtime import ensure_ray, file_sha256, gc_paused

__all__ = [
    "PreprocessConfig",
    "PreprocessError",
    "StrictModeError",
    "format_summary",
    "run_preprocess",
]


class PreprocessError(RuntimeError):
    """Raised when the job cannot produce a complete, consistent output."""


class StrictModeError(PreprocessError):
    """Raised in ``strict`` mode for the first item that would have been skipped."""


@dataclass
class PreprocessConfig:
    """One preprocessing run.

    Attributes:
        dataset: REFER dataset name (``refcoco``, ``refcoco+``, ``refcocog``, ``refclef``, ``synthetic``).
        split_by: Split variant (``unc``, ``google``, ``umd``, ``berkeley``).
        refer_root: Folder with ``<dataset>/refs(<split_by>).p`` and ``<dataset>/instances.json``.
        image_root: Folder the images' ``file_name`` are relative to.
        out: Output folder (replaced atomically when ``overwrite``).
        image_size: Side of the letterboxed square canvas.
        rows_per_file: Most rows per Parquet file.
        image_format: Encoding of the canvas bytes, ``jpeg`` (quality 95, 4:4:4) or ``png``.
        images_per_task: Most images per Ray task (one split each); larger amortises scheduling. The last
            tasks get fewer, so that the workers finish together (:func:`chunk_by_split`). A task writes its
            own Parquet file(s), so this also sets the typical file size.
        strict: Fail on the first skipped item instead of listing it.
        overwrite: Replace an existing output instead of refusing.
    """

    dataset: str
    split_by: str
    refer_root: Path
    image_root: Path
    out: Path
    image_size: int = 448
    rows_per_file: int = 1000
    image_format: str = "jpeg"
    images_per_task: int = 128
    strict: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.refer_root, self.image_root, self.out = (
            Path(self.refer_root),
            Path(self.image_root),
            Path(self.out),
        )
        ReferSource(self.refer_root, self.dataset, self.split_by, self.image_root)  # validates the names
        if not 16 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be within 16..4096, got {self.image_size}")
        if self.rows_per_file < 1 or self.images_per_task < 1:
            raise ValueError("rows_per_file and images_per_task must be >= 1")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")

    @property
    def source(self) -> ReferSource:
        """The REFER source this run reads."""
        return ReferSource(self.refer_root, self.dataset, self.split_by, self.image_root)


def _problem_to_skip(problem: ReferProblem) -> Skip:
    return Skip(
        reason=problem.reason,
        split=problem.split,
        image_id=problem.image_id,
        file_name=problem.file_name,
        ann_id=problem.ann_id,
        ref_ids=() if problem.ref_id is None else (problem.ref_id,),
        sent_ids=problem.sent_ids,
    )


CHUNKS_DIR = "_chunks"  # inside the staging folder: one JSON record per chunk (its node, images and skips)


def _encode_batch(
    batch: dict[str, np.ndarray], image_root: str, image_size: int, image_format: str, strict: bool, chunk_dir: str
) -> pa.Table:
    """Ray Data UDF: chunks of packed :class:`ImageTask` s (:func:`pack_tasks`) -> a table of rows.

    Each chunk's record goes to ``chunk_dir/chunk-<n>.json``, named after the chunk: a retried task rewrites its
    own file, so nothing is counted twice, and no extra process is needed to gather them.
    """
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    rows: list[dict[str, Any]] = []
    for chunk_id, chunk in zip(batch["chunk"], batch["tasks"], strict=True):
        skips: list[Skip] = []
        tasks = unpack_tasks(chunk)
        for task in tasks:
            task_rows, task_skips = encode_image_task(task, image_root, image_size, image_format)
            rows += task_rows
            skips += task_skips
        if skips and strict:
            first = skips[0]
            raise StrictModeError(f"strict mode: image {first.image_id} ({first.file_name}): {first.reason}")
        record = {"node": node, "images": len(tasks), "skips": [s.to_dict() for s in skips]}
        path = Path(chunk_dir) / f"chunk-{int(chunk_id):06d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)
    return rows_to_table(rows)


def _read_chunk_records(chunk_dir: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The skips the encoder wrote, in chunk order, and the images each Ray node encoded."""
    skips: list[dict[str, Any]] = []
    nodes: Counter[str] = Counter()
    for path in sorted(chunk_dir.glob("chunk-*.json")):
        record = json.loads(path.read_text("utf-8"))
        skips += record["skips"]
        nodes[record["node"]] += record["images"]
    return skips, dict(sorted(nodes.items()))


def _split_parquet_datasink(root: Path, rows_per_file: int) -> Any:
    """A Ray Data sink that writes rows into ``root/<split>/`` as files of at most ``rows_per_file`` rows."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class SplitParquetDatasink(Datasink[None]):
        # NOTE: no ``min_rows_per_write``: the sink fuses with the encoder, so that each task encodes and
        # writes its own chunk without sending the encoded images through the object store. (Fused, a row
        # minimum would bundle the encoder's *input*, one row per chunk, into a few huge tasks.)
        def write(self, blocks: Any, ctx: Any) -> None:
            tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
            if not tables:
                return  # every image of the chunk was skipped
            table = pa.concat_tables(tables)
            splits = table["split"].unique().to_pylist()
            for split in splits:
                # A chunk holds one split, so the filter (a copy of every image's bytes) is rarely needed.
                part = table if len(splits) == 1 else table.filter(pc.equal(table["split"], split))
                for i, start in enumerate(range(0, part.num_rows, rows_per_file)):
                    # Named after the task: a retried task overwrites its own files instead of adding copies.
                    name = f"part-{ctx.task_idx:05d}-{i:03d}.parquet"
                    pq.write_table(part.slice(start, rows_per_file), root / split / name)

    return SplitParquetDatasink()


def _write_splits(config: PreprocessConfig, tasks: list[ImageTask], stage: Path) -> None:
    """Encodes every split's image tasks in one Ray Data execution and writes them into ``stage/<split>/``."""
    import ray

    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    with gc_paused():
        chunks = [
            {"chunk": i, "tasks": pack_tasks(chunk)}
            for i, chunk in enumerate(chunk_by_split(tasks, config.images_per_task, workers))
        ]
    if not chunks:
        return
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(
        _encode_batch,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "image_root": str(config.image_root.absolute()),
            "image_size": config.image_size,
            "image_format": config.image_format,
            "strict": config.strict,
            "chunk_dir": str(stage / CHUNKS_DIR),
        },
    )
    # NOTE: Ray Data's reservation allocator sets a share of the CPUs aside for each operator up front; on a
    # small node (2 CPUs) that leaves the encoder one task at a time, measured at ~1.0x a plain loop. The
    # job has one operator doing the work, so the reservation buys nothing (benchmarks/preprocess.py).
    ds.context.op_resource_reservation_enabled = False
    ds.write_datasink(_split_parquet_datasink(stage, config.rows_per_file))


def _commit(stage: Path, out: Path) -> None:
    """Moves the finished ``stage`` to ``out``, replacing an old output by two renames (never a mix)."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def run_preprocess(config: PreprocessConfig, num_cpus: int | None = None) -> dict[str, Any]:
    """Runs the job and returns the manifest it wrote.

    Args:
        config: What to preprocess and where to.
        num_cpus: CPUs for a local Ray started here (ignored when Ray is running or ``RAY_ADDRESS`` is set).

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is false.
        StrictModeError: In strict mode, on the first item that would be skipped.
        PreprocessError: If the job fails or its row accounting does not add up.
    """
    out = config.out.absolute()
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite (--overwrite) to replace it")
    started = time.perf_counter()
    source = config.source
    dataset = ReferDataset.load(source)
    reader_skips = [_problem_to_skip(p) for p in dataset.problems]
    if reader_skips and config.strict:
        raise StrictModeError(f"strict mode: {reader_skips[0].reason} (ref {reader_skips[0].ref_ids})")
    with gc_paused():
        tasks = build_image_tasks(dataset)
    splits = list(dict.fromkeys([t.split for t in tasks] + [s.split for s in reader_skips if s.split]))
    expected: Counter[str] = Counter(e.split for e in dataset.expressions)
    for s in reader_skips:
        expected[s.split or "?"] += len(s.sent_ids)

    ensure_ray(num_cpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        for split in [*splits, CHUNKS_DIR]:
            (stage / split).mkdir()
        _write_splits(config, tasks, stage)
        encoder_skips, nodes = _read_chunk_records(stage / CHUNKS_DIR)
        skips = [s.to_dict() for s in reader_skips] + encoder_skips
        shutil.rmtree(stage / CHUNKS_DIR)
        manifest = _build_manifest(config, dataset, tasks, splits, expected, skips, stage, started)
        manifest["encoded_by_node"] = nodes
        write_manifest(stage, manifest)
        _commit(stage, out)
    except StrictModeError:
        raise
    except Exception as err:
        message = _strict_message(err)
        if message is not None:
            raise StrictModeError(message) from err
        raise PreprocessError(f"preprocessing {source.dataset}({source.split_by}) failed: {err}") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _strict_message(err: BaseException) -> str | None:
    """The message of a :class:`StrictModeError` raised in a Ray task, or None.

    Ray Data wraps a task's exception in a ``UserCodeException`` whose cause does not survive the trip back, so
    the message is read from the remote traceback's last line for it (``...StrictModeError: strict mode: ...``),
    not from its quote of the source line that raised it.
    """
    if isinstance(err, StrictModeError):
        return str(err)
    found = re.findall(rf"^\S*\b{StrictModeError.__name__}: (strict mode: .*)$", str(err), flags=re.MULTILINE)
    return found[-1] if found else None


def _build_manifest(
    config: PreprocessConfig,
    dataset: ReferDataset,
    tasks: list[ImageTask],
    splits: list[str],
    expected: Counter[str],
    skips: list[dict[str, Any]],
    stage: Path,
    started: float,
) -> dict[str, Any]:
    """Counts what was written from the Parquet footers and checks it against what was expected."""
    lost: Counter[str] = Counter()
    for s in skips:
        lost[s["split"] or "?"] += s["expressions_lost"]
    per_split: dict[str, Any] = {}
    for split in splits:
        files = parquet_file_rows(stage / split)
        rows = sum(files.values())
        split_tasks = [t for t in tasks if t.split == split]
        if rows + lost[split] != expected[split]:
            raise PreprocessError(
                f"split {split}: {rows} rows written + {lost[split]} skipped != {expected[split]} expected"
            )
        per_split[split] = {
            "rows": rows,
            "expected_expressions": expected[split],
            "skipped_expressions": lost[split],
            "images": len(split_tasks) - sum(1 for s in skips if s["split"] == split and s["ann_id"] is None),
            "refs": len({e.ref_id for e in dataset.expressions if e.split == split}),
            "files": files,
        }
    elapsed = time.perf_counter() - started
    images = sum(len([t for t in tasks if t.split == split]) for split in splits)
    source = config.source
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": config.dataset,
        "split_by": config.split_by,
        "image_size": config.image_size,
        "image_format": config.image_format,
        "splits": per_split,
        "total_rows": sum(v["rows"] for v in per_split.values()),
        "skipped": skips,
        "skipped_count": len(skips),
        "source_files": {
            source.refs_path.name: file_sha256(source.refs_path),
            source.instances_path.name: file_sha256(source.instances_path),
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "code_version": code_version(),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 2) if elapsed > 0 else None,
        "columns": {name: str(dtype) for name, (dtype, _) in COLUMN_DOCS.items()},
    }


def format_summary(manifest: dict[str, Any]) -> str:
    """A plain-text table of rows, images and skips per split, with time and throughput."""
    header = f"{'split':<10} {'rows':>8} {'images':>8} {'refs':>7} {'skipped expr':>13} {'files':>6}"
    lines = [header, "-" * len(header)]
    for split, v in manifest["splits"].items():
        lines.append(
            f"{split:<10} {v['rows']:>8} {v['images']:>8} {v['refs']:>7} {v['skipped_expressions']:>13}"
            f" {len(v['files']):>6}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{manifest['total_rows']} rows, {manifest['skipped_count']} skipped items, "
        f"{manifest['elapsed_s']:.1f} s, {manifest['images_per_s']} images/s"
    )
    for s in manifest["skipped"][:20]:
        lines.append(f"  skipped [{s['split']}] image {s['image_id']} ann {s['ann_id']}: {s['reason']}")
    if manifest["skipped_count"] > 20:
        lines.append(f"  ... {manifest['skipped_count'] - 20} more in manifest.json")
    return "\n".join(lines)
