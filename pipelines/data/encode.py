"""Per-image work of preprocessing: decode and letterbox one image, then emit one row per expression.

The unit of work is an :class:`ImageTask`: one image of one split with every expression that refers to
it, so each image is decoded, letterboxed and encoded once however many sentences it has. The functions
here are pure Python (no Ray); the Ray Data job and the single-process benchmark call the same ones.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.data.refer import ReferExpression, UnsafeImagePathError, resolve_image_path
from pipelines.data.schema import ROW_SCHEMA
from pipelines.data.segmentation import SegmentationError, segmentation_to_rle
from vglaw.geometry import Letterbox
from vglaw.images import to_rgb8
from vglaw.rle import decode_rle, encode_mask

__all__ = [
    "IMAGE_FORMATS",
    "ImageTask",
    "Skip",
    "build_image_tasks",
    "chunk_by_split",
    "encode_canvas",
    "encode_image_task",
    "open_rgb_ready",
    "pack_tasks",
    "rows_to_table",
    "unpack_tasks",
]

IMAGE_FORMATS: tuple[str, ...] = ("jpeg", "png")


@dataclass(frozen=True)
class Skip:
    """Something the job could not turn into rows, and the expressions lost with it.

    Attributes:
        reason: Why, in words.
        split: Split of the lost expressions.
        image_id: Image concerned.
        file_name: Image file relative to the image root.
        ann_id: Annotation concerned, or None when the whole image was skipped.
        ref_ids: Refs whose sentences were lost.
        sent_ids: Sentences lost (each one an expression).
    """

    reason: str
    split: str | None
    image_id: int | None
    file_name: str | None = None
    ann_id: int | None = None
    ref_ids: tuple[int, ...] = ()
    sent_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the number of expressions lost."""
        out = asdict(self)
        out["ref_ids"], out["sent_ids"] = list(self.ref_ids), list(self.sent_ids)
        out["expressions_lost"] = len(self.sent_ids)
        return out


@dataclass
class ImageTask:
    """One image of one split and every expression about it.

    Attributes:
        image_id: Image id.
        split: Split of all expressions here.
        file_name: Image file relative to the image root.
        width: Width according to ``instances.json``.
        height: Height according to ``instances.json``.
        annotations: ``ann_id -> {category_id, bbox, segmentation, iscrowd}``.
        expressions: ``(ref_id, ann_id, sent_id, text)`` tuples.
    """

    image_id: int
    split: str
    file_name: str
    width: int
    height: int
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    expressions: list[tuple[int, int, int, str]] = field(default_factory=list)

    def skip(self, reason: str, ann_id: int | None = None) -> Skip:
        """A :class:`Skip` for the whole image (``ann_id`` None) or for one annotation's expressions."""
        lost = [e for e in self.expressions if ann_id is None or e[1] == ann_id]
        return Skip(
            reason=reason,
            split=self.split,
            image_id=self.image_id,
            file_name=self.file_name,
            ann_id=ann_id,
            ref_ids=tuple(sorted({e[0] for e in lost})),
            sent_ids=tuple(e[2] for e in lost),
        )


def build_image_tasks(expressions: Iterable[ReferExpression]) -> list[ImageTask]:
    """Groups expressions by (split, image), in first-seen order.

    NOTE: grouped by split too, because some split variants (refcocog google) put one image in two splits.
    """
    tasks: dict[tuple[str, int], ImageTask] = {}
    for e in expressions:
        key = (e.split, e.image_id)
        task = tasks.get(key)
        if task is None:
            task = ImageTask(e.image_id, e.split, e.image.file_name, e.image.width, e.image.height)
            tasks[key] = task
        task.annotations.setdefault(
            e.ann_id,
            {
                "category_id": e.category_id,
                "bbox": list(e.box_xywh),
                "segmentation": e.segmentation,
                "iscrowd": e.iscrowd,
            },
        )
        task.expressions.append((e.ref_id, e.ann_id, e.sent_id, e.expression))
    return list(tasks.values())


def pack_tasks(tasks: list[ImageTask]) -> bytes:
    """Serialises a chunk of tasks into the one binary cell that Ray Data carries to an encoder."""
    # NOTE: pickle rather than JSON: about 4x faster to write, and this is serial work on the driver before
    # any encoder starts. These bytes are made by the job's own driver for its own workers, as every Ray task
    # argument is; files from disk never come through here (their pickles go through vglaw.safe_pickle).
    return pickle.dumps([vars(t) for t in tasks], protocol=pickle.HIGHEST_PROTOCOL)


def unpack_tasks(data: bytes) -> list[ImageTask]:
    """Inverse of :func:`pack_tasks`."""
    return [ImageTask(**fields) for fields in pickle.loads(data)]


def chunk_by_split(tasks: list[ImageTask], size: int, workers: int = 1) -> list[list[ImageTask]]:
    """Cuts tasks into chunks of one split each, in the order they should run.

    Early chunks hold ``size`` tasks, which amortises the cost of a task; towards the end each chunk takes
    about a ``2 * workers``-th of what is left, down to ``size // 8`` (guided self-scheduling), so that
    ``workers`` parallel workers finish close together instead of one waiting for another's full-size last
    chunk. Splits come largest first.

    Args:
        tasks: Image tasks, in the order they should be encoded within a split.
        size: Most tasks per chunk.
        workers: How many chunks run at once.
    """
    by_split: dict[str, list[ImageTask]] = {}
    for task in tasks:
        by_split.setdefault(task.split, []).append(task)
    smallest = max(1, size // 8)
    remaining = len(tasks)
    chunks: list[list[ImageTask]] = []
    for split_tasks in sorted(by_split.values(), key=len, reverse=True):
        start = 0
        while start < len(split_tasks):
            take = min(size, max(smallest, -(-remaining // (2 * workers))))
            chunk = split_tasks[start : start + take]
            chunks.append(chunk)
            start += len(chunk)
            remaining -= len(chunk)
    return chunks


def open_rgb_ready(path: str | os.PathLike[str]) -> Image.Image:
    """Opens and fully decodes an image, as 8-bit RGB by :func:`vglaw.images.to_rgb8` (the conversion the
    Predictor and Serve use: 16-bit samples scaled, not clipped; alpha composited over black, the padding
    colour :func:`encode_image_task` letterboxes with).

    Raises:
        OSError: If the file is missing, truncated or not an image.
    """
    with open(path, "rb") as f:
        data = f.read()
    # Decoding from memory leaves no file to close, so the decoded image is returned as it is (closing a
    # file-backed PIL image frees its pixels, which would cost a copy of every image here).
    img = Image.open(io.BytesIO(data))
    img.load()  # NOTE: forces a full decode, so a truncated file fails here, not later.
    return to_rgb8(img)


def encode_canvas(canvas: Image.Image, image_format: str) -> bytes:
    """Encodes the letterboxed canvas: JPEG at quality 95 without chroma subsampling, or PNG."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        canvas.save(buf, format="JPEG", quality=95, subsampling=0)
    elif image_format == "png":
        canvas.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"unknown image format {image_format!r}; expected one of {IMAGE_FORMATS}")
    return buf.getvalue()


def encode_image_task(
    task: ImageTask, image_root: str | os.PathLike[str], image_size: int, image_format: str = "jpeg"
) -> tuple[list[dict[str, Any]], list[Skip]]:
    """Turns one image task into rows, or skips with reasons.

    Args:
        task: The image and its expressions.
        image_root: Folder the task's ``file_name`` is relative to.
        image_size: Side of the letterboxed canvas.
        image_format: ``jpeg`` or ``png`` for the canvas bytes.

    Returns:
        ``(rows, skips)``: one row per expression that could be encoded (columns of
        :data:`pipelines.data.schema.ROW_SCHEMA`), and what was skipped.
    """
    try:
        img = open_rgb_ready(resolve_image_path(image_root, task.file_name))
    except UnsafeImagePathError as err:
        return [], [task.skip(str(err))]
    except FileNotFoundError:
        return [], [task.skip("image file not found")]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return [], [task.skip(f"image does not decode: {type(err).__name__}: {err}")]
    if img.size != (task.width, task.height):
        w, h = img.size
        return [], [task.skip(f"image is {w}x{h} but instances.json says {task.width}x{task.height}")]
    lb = Letterbox.fit(task.width, task.height, image_size)
    image_bytes = encode_canvas(lb.image(img), image_format)
    skips: list[Skip] = []
    per_ann: dict[int, dict[str, Any]] = {}
    for ann_id, ann in task.annotations.items():
        try:
            rle = segmentation_to_rle(ann["segmentation"], task.height, task.width)
        except SegmentationError as err:
            skips.append(task.skip(f"annotation does not decode: {err}", ann_id))
            continue
        canvas_rle = encode_mask(lb.mask_to_canvas(decode_rle(rle["counts"], rle["size"])))
        box = np.asarray(ann["bbox"], dtype=np.float64)
        per_ann[ann_id] = {
            "category_id": int(ann["category_id"]),
            "box_xywh": box.tolist(),
            "box_cxcywh_norm": lb.box_to_normalized_cxcywh(box).tolist(),
            "iscrowd": bool(ann["iscrowd"]),
            "mask_rle": rle["counts"],
            "mask_size": [task.height, task.width],
            "mask_canvas_rle": canvas_rle["counts"],
        }
    geometry = {
        "orig_width": lb.orig_w,
        "orig_height": lb.orig_h,
        "canvas_size": lb.size,
        "resized_width": lb.new_w,
        "resized_height": lb.new_h,
        "pad_x": lb.pad_x,
        "pad_y": lb.pad_y,
        "scale_x": lb.scale_x,
        "scale_y": lb.scale_y,
    }
    rows = []
    for ref_id, ann_id, sent_id, text in task.expressions:
        if ann_id not in per_ann:
            continue
        row = {"ref_id": ref_id, "ann_id": ann_id, "image_id": task.image_id, "sent_id": sent_id}
        row.update(split=task.split, expression=text, file_name=task.file_name, image=image_bytes)
        row.update(geometry)
        row.update(per_ann[ann_id])
        rows.append(row)
    return rows, skips


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Packs rows into an Arrow table with exactly :data:`ROW_SCHEMA` (an empty list gives 0 rows)."""
    columns = {name: [row[name] for row in rows] for name in ROW_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=ROW_SCHEMA)
