"""Rows of the Parquet split -> model-ready tensors, with the flip augmentation. Needs no Ray."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipelines.data.parquet import decode_image
from vglaw.geometry import swap_spatial_words
from vglaw.rle import decode_rle
from vglaw.tokenizer import ExpressionTokenizer


@dataclass
class TrainingBatch:
    """One step's inputs and targets; images stay uint8 until they reach the device."""

    images: Tensor  # [B, 3, S, S] uint8
    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L] bool
    boxes: Tensor  # [B, 4] float32, normalised (cx, cy, w, h) on the canvas
    masks: Tensor  # [B, S, S] uint8 {0, 1} on the canvas
    categories: Tensor  # [B] int64, the referred objects' category ids
    expressions: list[str]

    def __len__(self) -> int:
        return len(self.expressions)

    def to(self, device: torch.device | str) -> TrainingBatch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return TrainingBatch(
            move(self.images),
            move(self.input_ids),
            move(self.attention_mask),
            move(self.boxes),
            move(self.masks),
            move(self.categories),
            self.expressions,
        )


def collate_rows(
    batch: Mapping[str, Any],
    tokenizer: ExpressionTokenizer,
    rng: np.random.Generator | None = None,
    hflip_prob: float = 0.0,
) -> TrainingBatch:
    """Decode a columnar batch (Ray Data's numpy format or a dict of lists) into a :class:`TrainingBatch`.

    With ``rng`` and ``hflip_prob`` > 0, each sample is mirrored with that probability: image, box and mask on
    the canvas, and "left"/"right" (and their relatives) swapped in the expression.
    """
    expressions = [str(e) for e in batch["expression"]]
    n = len(expressions)
    size = int(batch["canvas_size"][0])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8)
    boxes = np.asarray([np.asarray(b, dtype=np.float32).reshape(4) for b in batch["box_cxcywh_norm"]])
    for i in range(n):
        images[i] = decode_image(batch["image"][i])
        masks[i] = decode_rle(batch["mask_canvas_rle"][i], [size, size])
    if rng is not None and hflip_prob > 0:
        flip = rng.random(n) < hflip_prob
        images[flip] = images[flip, :, ::-1]
        masks[flip] = masks[flip, :, ::-1]
        boxes[flip, 0] = 1.0 - boxes[flip, 0]
        expressions = [swap_spatial_words(e) if f else e for e, f in zip(expressions, flip)]
    tokens = tokenizer(expressions)
    return TrainingBatch(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        boxes=torch.from_numpy(boxes),
        masks=torch.from_numpy(masks),
        categories=torch.as_tensor(np.asarray(batch["category_id"], dtype=np.int64)),
        expressions=expressions,
    )
