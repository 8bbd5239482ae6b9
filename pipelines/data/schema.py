"""The Parquet row schema of preprocessed referring datasets: one row per referring expression.

Bump :data:`SCHEMA_VERSION` whenever a column is added, removed or changes meaning; readers check it
against ``manifest.json``. ``docs/data.md`` documents the same table for people.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["COLUMN_DOCS", "EVAL_COLUMNS", "ROW_SCHEMA", "SCHEMA_VERSION", "TRAINING_COLUMNS"]

SCHEMA_VERSION = 1

_BOX = pa.list_(pa.float64(), 4)  # fixed-size list of 4

COLUMN_DOCS: dict[str, tuple[pa.DataType, str]] = {
    "ref_id": (pa.int64(), "REFER ref id (one referred object)"),
    "ann_id": (pa.int64(), "annotation id of the referred object in instances.json"),
    "image_id": (pa.int64(), "image id in instances.json"),
    "sent_id": (pa.int64(), "sentence id; (ref_id, sent_id) is unique"),
    "category_id": (pa.int64(), "category of the referred object"),
    "split": (pa.string(), "train / val / testA / testB / test ..."),
    "expression": (pa.string(), "the raw referring expression, untouched (untruncated, unicode)"),
    "file_name": (pa.string(), "image file relative to the image root (provenance only)"),
    "image": (pa.binary(), "the letterboxed canvas, encoded (format in manifest.image_format)"),
    "orig_width": (pa.int32(), "original image width in pixels"),
    "orig_height": (pa.int32(), "original image height in pixels"),
    "canvas_size": (pa.int32(), "side of the square letterboxed canvas"),
    "resized_width": (pa.int32(), "width of the resized image on the canvas"),
    "resized_height": (pa.int32(), "height of the resized image on the canvas"),
    "pad_x": (pa.int32(), "columns of padding left of the image"),
    "pad_y": (pa.int32(), "rows of padding above the image"),
    "scale_x": (pa.float64(), "resized_width / orig_width"),
    "scale_y": (pa.float64(), "resized_height / orig_height"),
    "box_xywh": (_BOX, "COCO box [x, y, w, h] in original pixels"),
    "box_cxcywh_norm": (_BOX, "box (cx, cy, w, h) on the canvas divided by canvas_size: the model's target"),
    "iscrowd": (pa.bool_(), "whether the annotation is a crowd (RLE) annotation"),
    "mask_rle": (pa.binary(), "mask at original resolution: COCO compressed RLE counts"),
    "mask_size": (pa.list_(pa.int32(), 2), "RLE size [orig_height, orig_width]"),
    "mask_canvas_rle": (pa.binary(), "mask letterboxed to the canvas: COCO RLE counts, size [S, S]"),
}

ROW_SCHEMA: pa.Schema = pa.schema(
    [pa.field(name, dtype, nullable=False) for name, (dtype, _) in COLUMN_DOCS.items()],
    metadata={"vglaw.schema_version": str(SCHEMA_VERSION)},
)

# The columns training reads (ref_id and sent_id key each row's flip decision).
TRAINING_COLUMNS: tuple[str, ...] = (
    "ref_id",
    "sent_id",
    "expression",
    "image",
    "canvas_size",
    "box_cxcywh_norm",
    "mask_canvas_rle",
    "category_id",
)

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
