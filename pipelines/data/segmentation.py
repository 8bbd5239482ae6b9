"""COCO segmentations to run-length encodings, through pycocotools.

A COCO ``segmentation`` comes in three shapes, and the REFER datasets use all of them:

* polygons, ``[[x0, y0, x1, y1, ...], ...]``: one list per part (an occluded object has several);
* uncompressed RLE, ``{"size": [h, w], "counts": [int, ...]}``: crowd annotations (``iscrowd = 1``);
* compressed RLE, ``{"size": [h, w], "counts": "<ascii>"}``: refclef, and COCO results files.

Everything is normalised to one compressed RLE (``counts`` as bytes, ``size`` as ``[h, w]``), which is what
the Parquet rows store and what :func:`vglaw.rle.decode_rle` turns back into a mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["SegmentationError", "rle_string_counts", "segmentation_to_rle"]


class SegmentationError(ValueError):
    """Raised when an annotation's segmentation cannot be decoded into a mask."""


def _polygons_to_rle(polygons: Sequence[Any], height: int, width: int) -> dict[str, Any]:
    """Merges the parts of a multi-part polygon into one compressed RLE."""
    parts: list[list[float]] = []
    for i, poly in enumerate(polygons):
        if not isinstance(poly, (list, tuple)) or not all(isinstance(v, (int, float)) for v in poly):
            raise SegmentationError(f"polygon part {i} is not a flat list of numbers")
        # NOTE: pycocotools reads fewer than 3 points out of bounds instead of failing; refuse them here.
        if len(poly) < 6 or len(poly) % 2:
            raise SegmentationError(f"polygon part {i} has {len(poly)} coordinates; need an even count >= 6")
        if not np.all(np.isfinite(poly)):
            raise SegmentationError(f"polygon part {i} has non-finite coordinates")
        parts.append([float(v) for v in poly])
    if not parts:
        raise SegmentationError("empty polygon list")
    return mask_utils.merge(mask_utils.frPyObjects(parts, height, width))


def rle_string_counts(counts: bytes) -> list[int]:
    """Parses COCO's compressed RLE string into its run lengths, refusing malformed input.

    The format (pycocotools ``rleFrString``): each run is a little-endian sequence of 5-bit groups
    offset by 48, bit 0x20 marking continuation, bit 0x10 of the last group the sign; runs after the
    second are stored as the difference to the run two before.

    Raises:
        SegmentationError: On a byte outside the alphabet, a truncated run or a negative run length.
    """
    runs: list[int] = []
    value = shift = 0
    for byte in counts:
        c = byte - 48
        if not 0 <= c < 64:
            raise SegmentationError(f"compressed RLE has a byte outside its alphabet: {byte!r}")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise SegmentationError("compressed RLE has a negative run length")
        runs.append(value)
        value = shift = 0
    if shift:
        raise SegmentationError("compressed RLE ends inside a run")
    return runs


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Turns any COCO segmentation into one compressed RLE at ``height x width``.

    Args:
        segmentation: Polygons, uncompressed RLE or compressed RLE, as in ``instances.json``.
        height: Image height the segmentation refers to.
        width: Image width the segmentation refers to.

    Returns:
        ``{"size": [height, width], "counts": bytes}``.

    Raises:
        SegmentationError: If the segmentation is malformed or its size disagrees with the image.
    """
    if isinstance(segmentation, Mapping):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise SegmentationError(f"RLE without a valid size: {size!r}")
        if [int(size[0]), int(size[1])] != [height, width]:
            raise SegmentationError(f"RLE size {list(size)} differs from the image's [{height}, {width}]")
        if isinstance(counts, (list, tuple)):
            if sum(int(c) for c in counts) != height * width or any(int(c) < 0 for c in counts):
                raise SegmentationError("uncompressed RLE counts do not cover the image exactly")
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
        elif isinstance(counts, (str, bytes)):
            raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            # NOTE: pycocotools decodes a corrupt string without complaint (reading past its buffer), so
            # the counts are parsed and checked here first.
            if sum(rle_string_counts(raw)) != height * width:
                raise SegmentationError("compressed RLE counts do not cover the image exactly")
            rle = {"size": [height, width], "counts": raw}
        else:
            raise SegmentationError(f"RLE counts of unsupported type {type(counts).__name__}")
    elif isinstance(segmentation, (list, tuple)):
        rle = _polygons_to_rle(segmentation, height, width)
    else:
        raise SegmentationError(f"segmentation of unsupported type {type(segmentation).__name__}")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
