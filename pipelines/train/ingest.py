"""Training ingest: Parquet rows -> decoded arrays in Ray Data tasks -> a :class:`TrainingBatch` on the device.

The per-row work happens off the training step, in two parts:

* :func:`encode_training_rows` runs in Ray Data (``map_batches`` on CPU tasks, which on a cluster may also run on
  CPU-only nodes): it decodes the canvas and its mask and tokenises the expression twice, as written and with
  its spatial words mirrored. Its output is fixed-size arrays, so the workers' ``iter_torch_batches`` stacks
  them into tensors and prefetches the next batches while a step runs.
* :func:`to_training_batch` runs on the worker: it moves the tensors to the device and applies the flips there
  (a mirrored view of image and mask, ``1 - cx`` for the box, the mirrored token row), so the trainer's own
  per-step work is the copy to the device.

With ``data.image_decode: device`` the canvases stay JPEG bytes through Ray Data (``decode_images=False``,
collated by :func:`tensors_of`) and :func:`to_training_batch` decodes them on the worker's GPU with nvJPEG
(``torchvision.io.decode_jpeg``), which takes that work off the CPUs altogether.

The flip of a row is a function of ``(seed, epoch, ref_id, sent_id)`` (:func:`flip_decisions`), not of the
batch it lands in, so a resumed epoch flips every row as the first try did. :func:`collate_rows` chains the two
for callers without Ray. :func:`started_ahead` lets the next epoch's stream fill while the last one is validated.
Needs no Ray.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from pipelines.data.parquet import decode_image
from vglaw.geometry import swap_spatial_words
from vglaw.rle import decode_rle
from vglaw.tokenizer import ExpressionTokenizer

__all__ = [
    "TrainingBatch",
    "collate_rows",
    "decode_jpegs",
    "encode_training_rows",
    "flip_decisions",
    "started_ahead",
    "tensors_of",
    "to_training_batch",
]

T = TypeVar("T")
_END = object()


@dataclass
class TrainingBatch:
    """One step's inputs and targets; images stay uint8 until the model normalises them."""

    images: Tensor  # [B, 3, S, S] uint8
    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L] bool
    boxes: Tensor  # [B, 4] float32, normalised (cx, cy, w, h) on the canvas
    masks: Tensor  # [B, S, S] uint8 {0, 1} on the canvas
    categories: Tensor  # [B] int64, the referred objects' category ids

    def __len__(self) -> int:
        return self.images.shape[0]


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab: tuple[tuple[str, int], ...], max_tokens: int) -> ExpressionTokenizer:
    # NOTE: a Ray Data task process runs many batches; the tokenizer is built once per process and vocab.
    return ExpressionTokenizer(dict(vocab), max_tokens=max_tokens)


def encode_training_rows(
    batch: Mapping[str, Any], vocab: Mapping[str, int], max_tokens: int, decode_images: bool = True
) -> dict[str, np.ndarray]:
    """Decodes a batch of training rows into fixed-size arrays (the ``map_batches`` function of training ingest).

    Args:
        batch: Columns :data:`pipelines.data.schema.TRAINING_COLUMNS` (Ray Data's ``numpy`` format or lists).
        vocab: The run's WordPiece vocab (``ExpressionTokenizer.vocab``).
        max_tokens: Token budget per expression; token rows are padded to it.
        decode_images: False keeps each canvas as its encoded bytes (``image_jpeg``), for decoding on the GPU.

    Returns:
        ``image`` [B, S, S, 3] uint8 (or ``image_jpeg``, [B] bytes), ``mask`` [B, S, S] uint8, ``box`` [B, 4]
        float32 (cx, cy, w, h)/S, ``category`` [B] int64, ``ref_id`` and ``sent_id`` [B] int64, and
        ``input_ids`` [B, 2, max_tokens] int64 with ``attention_mask`` [B, 2, max_tokens] bool: row 0 the
        expression as written, row 1 with its spatial words mirrored.
    """
    expressions = [str(e) for e in batch["expression"]]
    n = len(expressions)
    size = int(batch["canvas_size"][0])
    masks = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        masks[i] = decode_rle(batch["mask_canvas_rle"][i], [size, size])
    if decode_images:
        # NOTE: channels last, as decoded: the transpose to the model's layout is a copy, cheaper on the device.
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        for i in range(n):
            images[i] = decode_image(batch["image"][i])
        pictures = {"image": images}
    else:
        pictures = {"image_jpeg": np.asarray([bytes(b) for b in batch["image"]], dtype=object)}
    tokenizer = _tokenizer(tuple(vocab.items()), max_tokens)
    input_ids = np.full((n, 2, max_tokens), tokenizer.pad_id, dtype=np.int64)
    attention = np.zeros((n, 2, max_tokens), dtype=bool)
    for variant, texts in enumerate((expressions, [swap_spatial_words(e) for e in expressions])):
        tokens = tokenizer(texts)
        length = tokens.input_ids.shape[1]
        input_ids[:, variant, :length] = tokens.input_ids.numpy()
        attention[:, variant, :length] = tokens.attention_mask.numpy()
    return {
        **pictures,
        "mask": masks,
        "box": np.asarray([np.asarray(b, dtype=np.float32).reshape(4) for b in batch["box_cxcywh_norm"]]),
        "category": np.asarray(batch["category_id"], dtype=np.int64),
        "ref_id": np.asarray(batch["ref_id"], dtype=np.int64),
        "sent_id": np.asarray(batch["sent_id"], dtype=np.int64),
        "input_ids": input_ids,
        "attention_mask": attention,
    }


def flip_decisions(seed: int, epoch: int, ref_ids: Sequence[int], sent_ids: Sequence[int], prob: float) -> np.ndarray:
    """Which rows to mirror: row ``(ref_id, sent_id)`` flips with probability ``prob``, decided by its own
    generator seeded with ``(seed, epoch, ref_id, sent_id)``. Returns a [B] bool array."""
    if prob <= 0.0:
        return np.zeros(len(ref_ids), dtype=bool)
    draws = [np.random.default_rng([seed, epoch, int(r), int(s)]).random() for r, s in zip(ref_ids, sent_ids)]
    return np.asarray(draws) < prob


def tensors_of(batch: Mapping[str, np.ndarray]) -> dict[str, Tensor | list[Tensor]]:
    """``iter_torch_batches``'s ``collate_fn`` for rows encoded with ``decode_images=False``: tensors of every
    column, the JPEG bytes as one uint8 tensor per row (their lengths differ)."""
    return {
        name: [torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy()) for b in values]
        if name == "image_jpeg"
        else torch.from_numpy(np.ascontiguousarray(values))
        for name, values in batch.items()
    }


def to_training_batch(
    arrays: Mapping[str, Any], flips: Tensor | np.ndarray, device: torch.device | str, full_tokens: bool = False
) -> TrainingBatch:
    """Moves one batch of :func:`encode_training_rows` output to ``device`` and applies ``flips`` there.

    Args:
        arrays: The encoded columns as tensors (``iter_torch_batches`` output, or :func:`tensors_of` for JPEG
            bytes, which are decoded here, on ``device``), on any device.
        flips: [B] bool, the rows to mirror (:func:`flip_decisions`).
        device: Where the step runs.
        full_tokens: Keep the token rows at ``max_tokens`` instead of cutting them to the batch's longest
            expression: every batch then has one shape, which a compiled model compiles once (a length that
            changes from batch to batch compiles it again for dynamic shapes, which on the CPU doubles the time).
    """
    flip = torch.as_tensor(flips, dtype=torch.bool).cpu()
    # Tokens are picked and cut on the host: cutting needs the batch's longest expression, a host value.
    rows, variant = torch.arange(len(flip)), flip.long()
    input_ids, attention = arrays["input_ids"].cpu()[rows, variant], arrays["attention_mask"].cpu()[rows, variant]
    # Token rows were padded to max_tokens; tokenising the batch would not have.
    length = attention.shape[1] if full_tokens else int(attention.sum(dim=1).max())
    move = lambda tensor: tensor.to(device, non_blocking=True)  # noqa: E731
    masks, boxes = move(arrays["mask"]), move(arrays["box"]).float()
    if "image_jpeg" in arrays:
        images = decode_jpegs(arrays["image_jpeg"], device)  # [B, 3, S, S]
    else:
        images = move(arrays["image"]).permute(0, 3, 1, 2)  # a view of [B, S, S, 3]
    # Mirror only the flipped rows, in place; their indices come from the host, so nothing waits on the device.
    flipped = move(flip.nonzero().flatten())
    images[flipped] = images[flipped].flip(3)
    masks[flipped] = masks[flipped].flip(2)  # [B, S, S]
    boxes[flipped, 0] = 1.0 - boxes[flipped, 0]
    return TrainingBatch(
        images=images.contiguous(),
        input_ids=move(input_ids[:, :length].contiguous()),
        attention_mask=move(attention[:, :length].contiguous()),
        boxes=boxes,
        masks=masks,
        categories=move(arrays["category"]),
    )


def decode_jpegs(data: Sequence[Tensor], device: torch.device | str) -> Tensor:
    """JPEG canvases (one uint8 tensor of bytes each) decoded to [B, 3, S, S] uint8 RGB on ``device``: nvJPEG on
    a CUDA device, libjpeg-turbo on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return torch.stack(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))


def collate_rows(
    batch: Mapping[str, Any],
    tokenizer: ExpressionTokenizer,
    flips: np.ndarray | None = None,
    device: torch.device | str = "cpu",
) -> TrainingBatch:
    """Rows straight to a :class:`TrainingBatch` in this process: :func:`encode_training_rows`, then
    :func:`to_training_batch` (no flips when ``flips`` is None)."""
    arrays = encode_training_rows(batch, tokenizer.vocab, tokenizer.max_tokens)
    tensors = {name: torch.from_numpy(values) for name, values in arrays.items()}
    n = len(arrays["category"])
    return to_training_batch(tensors, np.zeros(n, dtype=bool) if flips is None else flips, device)


def started_ahead(items: Iterable[T]) -> Iterator[T]:
    """``items``, whose first item is already being fetched on a background thread.

    A Ray Data stream starts executing on its first ``next()`` and takes seconds to deliver its first batch
    (tasks scheduled, files read, the first block decoded). Started ahead, that happens while the caller does
    other work, such as validating the epoch before. The returned iterator yields every item, the first
    included, and re-raises on the caller's thread whatever the fetch raised.
    """
    iterator = iter(items)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-ahead")
    first = pool.submit(next, iterator, _END)
    pool.shutdown(wait=False)  # the thread ends with its one fetch

    def chained() -> Iterator[T]:
        item = first.result()
        if item is _END:
            return
        yield item
        yield from iterator

    return chained()
