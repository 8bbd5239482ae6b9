"""Reading preprocessed referring datasets back: as a Ray Dataset, as Arrow, or row by row.

The decoders (:func:`decode_image`, :func:`decode_row`) need only numpy, PIL and pycocotools, so the
training loop, evaluation and tests can use them with or without Ray.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.data.manifest import read_manifest
from pipelines.data.schema import SCHEMA_VERSION
from vglaw.geometry import Letterbox
from vglaw.images import to_rgb8
from vglaw.rle import decode_rle

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "DecodedRow",
    "decode_image",
    "decode_row",
    "letterbox_of",
    "read_split",
    "read_split_table",
    "split_files",
]


def _checked_manifest(out_dir: str | os.PathLike[str], split: str) -> dict[str, Any]:
    manifest = read_manifest(out_dir)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version")
        raise ValueError(f"{out_dir} has schema version {found}, this code reads {SCHEMA_VERSION}; re-run it")
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in {out_dir}; available: {sorted(manifest['splits'])}")
    return manifest


def split_files(out_dir: str | os.PathLike[str], split: str) -> list[Path]:
    """The Parquet files of ``split``, as listed by the manifest (so stray files are never read)."""
    manifest = _checked_manifest(out_dir, split)
    return [Path(out_dir) / split / name for name in sorted(manifest["splits"][split]["files"])]


def read_split(
    out_dir: str | os.PathLike[str], split: str, columns: Sequence[str] | None = None, **read_kwargs: Any
) -> ray.data.Dataset:
    """A Ray Dataset over one split (one row per expression, columns of the row schema).

    Args:
        out_dir: Output folder of the preprocessing job.
        split: ``train``, ``val``, ``testA``, ...
        columns: Only these columns (Ray Data pushes the projection down into the Parquet reads).
        **read_kwargs: Passed to ``ray.data.read_parquet`` (``override_num_blocks=``, ...).
    """
    import ray.data

    files = [str(p) for p in split_files(out_dir, split)]
    if not files:
        return ray.data.from_arrow(read_split_table(out_dir, split, columns))
    # NOTE: one read task per file, each file one block. Ray 2.60's default Parquet reader (DataSourceV2) lists
    # the files in a task of its own and packs small files into one read task and one block, so everything
    # downstream of the read (the training decode) ran as one task on one core, and each pass waited 6-13 s
    # for its first batch instead of about 2 (docs/benchmarks.md, "Training ingest"). Its file-per-task reader
    # is still Ray's, selected by the documented ``DataContext.use_datasource_v2``.
    read_kwargs.setdefault("override_num_blocks", len(files))
    context = ray.data.DataContext.get_current()
    default_reader, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(files, **read_kwargs)
    finally:
        context.use_datasource_v2 = default_reader
    return ds if columns is None else ds.select_columns(list(columns))


def read_split_table(out_dir: str | os.PathLike[str], split: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One split as an Arrow table, with pyarrow alone."""
    from pipelines.data.schema import ROW_SCHEMA

    files = split_files(out_dir, split)
    if not files:
        schema = ROW_SCHEMA if columns is None else pa.schema([ROW_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f, columns=list(columns) if columns else None) for f in files])


def decode_image(data: bytes) -> np.ndarray:
    """Decodes the canvas bytes into a ``[S, S, 3]`` uint8 RGB array."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(to_rgb8(img))


def letterbox_of(row: Mapping[str, Any]) -> Letterbox:
    """The :class:`Letterbox` recorded in a row."""
    return Letterbox(
        orig_w=int(row["orig_width"]),
        orig_h=int(row["orig_height"]),
        size=int(row["canvas_size"]),
        new_w=int(row["resized_width"]),
        new_h=int(row["resized_height"]),
        pad_x=int(row["pad_x"]),
        pad_y=int(row["pad_y"]),
    )


@dataclass(frozen=True)
class DecodedRow:
    """One expression with its image, box and masks decoded.

    Attributes:
        ref_id: Ref id.
        ann_id: Annotation id.
        image_id: Image id.
        sent_id: Sentence id.
        split: Split name.
        expression: The raw expression.
        image: Letterboxed canvas, ``[S, S, 3]`` uint8.
        letterbox: The original-to-canvas mapping.
        box_xywh: ``[4]`` float64, original pixels.
        box_cxcywh_norm: ``[4]`` float64, normalised canvas coordinates (the model's target).
        mask: ``[orig_h, orig_w]`` uint8 {0, 1}, or None when not requested.
        mask_canvas: ``[S, S]`` uint8 {0, 1}, or None when not requested.
    """

    ref_id: int
    ann_id: int
    image_id: int
    sent_id: int
    split: str
    expression: str
    image: np.ndarray
    letterbox: Letterbox
    box_xywh: np.ndarray
    box_cxcywh_norm: np.ndarray
    mask: np.ndarray | None
    mask_canvas: np.ndarray | None


def decode_row(row: Mapping[str, Any], masks: bool = True) -> DecodedRow:
    """Decodes one row (a dict from ``Table.to_pylist()`` or a Ray row) into arrays.

    Args:
        row: The row's columns.
        masks: Also decode the original-resolution and canvas masks.
    """
    lb = letterbox_of(row)
    size = lb.size
    return DecodedRow(
        ref_id=int(row["ref_id"]),
        ann_id=int(row["ann_id"]),
        image_id=int(row["image_id"]),
        sent_id=int(row["sent_id"]),
        split=str(row["split"]),
        expression=str(row["expression"]),
        image=decode_image(row["image"]),
        letterbox=lb,
        box_xywh=np.asarray(row["box_xywh"], dtype=np.float64).reshape(4),
        box_cxcywh_norm=np.asarray(row["box_cxcywh_norm"], dtype=np.float64).reshape(4),
        mask=decode_rle(row["mask_rle"], [int(v) for v in row["mask_size"]]) if masks else None,
        mask_canvas=decode_rle(row["mask_canvas_rle"], [size, size]) if masks else None,
    )
