"""COCO compressed run-length encoding of binary masks: the one codec every part of the project uses.

Preprocessing stores masks this way in Parquet, evaluation decodes them, and Serve and the MLflow model return
predicted masks in it. The encoding is pycocotools' (column-major runs, ``counts`` as the compressed string),
so ``pycocotools.mask.decode`` reads back whatever :func:`encode_mask` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["decode_rle", "encode_mask"]


def encode_mask(mask: np.ndarray, *, text: bool = False) -> dict[str, Any]:
    """Encodes a ``[h, w]`` binary mask.

    Args:
        mask: Any array whose non-zero entries are the mask.
        text: Give ``counts`` as an ASCII string (for JSON) instead of bytes (for Parquet).

    Returns:
        ``{"size": [h, w], "counts": bytes | str}``.
    """
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    counts = rle["counts"].decode("ascii") if text else rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def decode_rle(counts: bytes | str, size: Sequence[int]) -> np.ndarray:
    """Decodes compressed RLE ``counts`` of a ``size = [h, w]`` mask into a uint8 ``[h, w]`` array of {0, 1}."""
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    return mask_utils.decode({"size": [int(size[0]), int(size[1])], "counts": raw})
