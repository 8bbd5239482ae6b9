"""Training ingest (decode in Ray Data, flips on the device) against an independent decode, and the category loss."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.data.encode import build_image_tasks, encode_canvas, encode_image_task
from pipelines.data.refer import ReferDataset, ReferSource
from pipelines.data.schema import SCHEMA_VERSION, TRAINING_COLUMNS
from pipelines.train.config import load_config
from pipelines.train.driver import _check_categories
from pipelines.train.ingest import (
    TrainingBatch,
    collate_rows,
    encode_training_rows,
    flip_decisions,
    started_ahead,
    tensors_of,
    to_training_batch,
)
from pipelines.train.optim import build_optimizer, build_scheduler
from pipelines.train.worker import build_model, train_step
from tests.pipelines.quirky_refer import QuirkyRefer
from vglaw.geometry import swap_spatial_words
from vglaw.losses import GroundingLoss
from vglaw.rle import encode_mask
from vglaw.tokenizer import ExpressionTokenizer
from vglaw.transforms import normalize

SIZE = 32


def _rows() -> dict[str, list]:
    """Two canvases, each with a block in its left half; the box and mask mark the block."""
    images, masks = [], []
    for colour in ((255, 0, 0), (0, 0, 255)):
        canvas = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        canvas[8:16, 4:12] = colour
        images.append(encode_canvas(Image.fromarray(canvas), "png"))
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[8:16, 4:12] = 1
        masks.append(encode_mask(mask)["counts"])
    box = [8 / SIZE, 12 / SIZE, 8 / SIZE, 8 / SIZE]  # (cx, cy, w, h) of the block
    return {
        "ref_id": [10, 11],
        "sent_id": [20, 21],
        "expression": ["the red block on the left", "the leftmost blue block"],
        "image": images,
        "canvas_size": [SIZE, SIZE],
        "box_cxcywh_norm": [box, box],
        "mask_canvas_rle": masks,
        "category_id": [3, 7],
    }


@pytest.fixture(scope="module")
def tokenizer() -> ExpressionTokenizer:
    words = ["the", "red", "blue", "block", "on", "left", "right", "leftmost", "rightmost"]
    return ExpressionTokenizer.train([" ".join(words)] * 4, vocab_size=64)


def test_collate_decodes_rows_with_their_categories(tokenizer: ExpressionTokenizer) -> None:
    rows = _rows()
    assert set(rows) == set(TRAINING_COLUMNS)
    batch = collate_rows(rows, tokenizer)
    assert batch.images.shape == (2, 3, SIZE, SIZE) and batch.images.dtype == torch.uint8
    assert batch.images[0, :, 10, 6].tolist() == [255, 0, 0] and batch.images[1, :, 10, 6].tolist() == [0, 0, 255]
    assert batch.masks.sum().item() == 2 * 64 and batch.masks[0, 8:16, 4:12].all()
    assert batch.categories.tolist() == [3, 7] and batch.categories.dtype == torch.int64
    tokens = tokenizer(rows["expression"])
    assert torch.equal(batch.input_ids, tokens.input_ids) and torch.equal(batch.attention_mask, tokens.attention_mask)


def test_flip_mirrors_image_box_mask_and_words_but_not_the_category(tokenizer: ExpressionTokenizer) -> None:
    rows = _rows()
    batch = collate_rows(rows, tokenizer, flips=np.array([True, True]))
    assert torch.equal(batch.input_ids, tokenizer(["the red block on the right", "the rightmost blue block"]).input_ids)
    assert batch.images[0, :, 10, SIZE - 1 - 6].tolist() == [255, 0, 0]
    assert batch.masks[0, 8:16, SIZE - 12 : SIZE - 4].all() and batch.masks.sum().item() == 2 * 64
    torch.testing.assert_close(batch.boxes[:, 0], torch.full((2,), 1 - 8 / SIZE))
    assert batch.categories.tolist() == [3, 7]


def test_full_token_rows_keep_one_shape_and_ground_as_the_cut_ones(tokenizer: ExpressionTokenizer) -> None:
    # What a compiled model trains on: every batch's token rows at max_tokens, the padding masked out.
    rows = _rows()
    encoded = encode_training_rows(rows, tokenizer.vocab, tokenizer.max_tokens)
    arrays = {k: torch.from_numpy(v) for k, v in encoded.items()}
    flips = np.array([False, True])
    cut = to_training_batch(arrays, flips, "cpu")
    full = to_training_batch(arrays, flips, "cpu", full_tokens=True)
    words = tokenizer(["the red block on the left", "the rightmost blue block"])  # the second row mirrored
    assert torch.equal(cut.input_ids, words.input_ids)
    assert full.input_ids.shape == (2, tokenizer.max_tokens) and full.attention_mask.shape == full.input_ids.shape
    length = words.input_ids.shape[1]
    assert torch.equal(full.input_ids[:, :length], words.input_ids)
    assert (full.input_ids[:, length:] == tokenizer.pad_id).all() and not full.attention_mask[:, length:].any()
    model = build_model(load_config("configs/test.yaml", ["model.overrides={image_size: 32}"]), tokenizer.vocab_size)
    model.eval()
    with torch.no_grad():
        images = normalize(cut.images)  # as train_step feeds the model
        short = model(images, cut.input_ids, cut.attention_mask)
        long = model(images, full.input_ids, full.attention_mask)
    torch.testing.assert_close(long.boxes, short.boxes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(long.mask_logits, short.mask_logits, rtol=1e-5, atol=1e-5)


def _reference(row: dict, flip: bool, tokenizer: ExpressionTokenizer) -> tuple:
    """One row decoded the plain way: PIL, pycocotools and numpy, as a training sample."""
    size = row["canvas_size"]
    image = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
    mask = mask_utils.decode({"size": [size, size], "counts": row["mask_canvas_rle"]})
    box = np.asarray(row["box_cxcywh_norm"], np.float32)
    expression = row["expression"]
    if flip:
        image, mask, box[0] = image[:, ::-1], mask[:, ::-1], 1.0 - box[0]
        expression = swap_spatial_words(expression)
    return image.transpose(2, 0, 1), mask, box, expression


def test_ingest_matches_a_plain_decode_of_the_rows(quirky_refer: QuirkyRefer, tokenizer: ExpressionTokenizer) -> None:
    source = ReferSource(quirky_refer.refer_root, "refcoco", "unc", quirky_refer.image_root)
    rows = [
        r
        for task in build_image_tasks(ReferDataset.load(source))
        for r in encode_image_task(task, quirky_refer.image_root, 64)[0]
    ]
    assert len(rows) >= 8
    columns = {name: [row[name] for row in rows] for name in TRAINING_COLUMNS}
    flips = flip_decisions(7, 1, columns["ref_id"], columns["sent_id"], 0.5)
    assert 0 < flips.sum() < len(rows)
    batch = collate_rows(columns, tokenizer, flips)
    expected = [_reference(row, bool(f), tokenizer) for row, f in zip(rows, flips)]
    assert np.array_equal(batch.images.numpy(), np.stack([e[0] for e in expected]))
    assert np.array_equal(batch.masks.numpy(), np.stack([e[1] for e in expected]))
    assert np.array_equal(batch.boxes.numpy(), np.stack([e[2] for e in expected]))
    tokens = tokenizer([e[3] for e in expected])
    assert torch.equal(batch.input_ids, tokens.input_ids) and torch.equal(batch.attention_mask, tokens.attention_mask)
    assert batch.categories.tolist() == columns["category_id"]
    # The Ray Data side alone: fixed-size arrays, both token variants, one row per input row.
    arrays = encode_training_rows(columns, tokenizer.vocab, tokenizer.max_tokens)
    assert arrays["input_ids"].shape == (len(rows), 2, tokenizer.max_tokens)
    assert arrays["image"].shape == (len(rows), 64, 64, 3)


def _quirky_columns(quirky_refer: QuirkyRefer) -> dict[str, list]:
    source = ReferSource(quirky_refer.refer_root, "refcoco", "unc", quirky_refer.image_root)
    rows = [
        r
        for task in build_image_tasks(ReferDataset.load(source))
        for r in encode_image_task(task, quirky_refer.image_root, 64)[0]
    ]
    return {name: [row[name] for row in rows] for name in TRAINING_COLUMNS}


def _device_decoded(columns: dict[str, list], tokenizer: ExpressionTokenizer, flips, device: str) -> TrainingBatch:
    """The rows as ``data.image_decode: device`` trains on them: JPEG bytes through the ingest, decoded here."""
    arrays = encode_training_rows(columns, tokenizer.vocab, tokenizer.max_tokens, decode_images=False)
    assert "image" not in arrays and len(arrays["image_jpeg"]) == len(columns["ref_id"])
    return to_training_batch(tensors_of(arrays), flips, device)


def test_decoding_jpegs_in_the_worker_matches_the_ingest_decode(
    quirky_refer: QuirkyRefer, tokenizer: ExpressionTokenizer
) -> None:
    columns = _quirky_columns(quirky_refer)
    assert all(bytes(b[:2]) == b"\xff\xd8" for b in columns["image"])  # JPEG canvases
    flips = flip_decisions(7, 1, columns["ref_id"], columns["sent_id"], 0.5)
    on_worker = _device_decoded(columns, tokenizer, flips, "cpu")  # torchvision's libjpeg-turbo
    reference = collate_rows(columns, tokenizer, flips)  # PIL in the ingest
    assert on_worker.images.shape == reference.images.shape and on_worker.images.dtype == torch.uint8
    difference = (on_worker.images.int() - reference.images.int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.05  # two JPEG decoders, same file
    for name in ("masks", "boxes", "input_ids", "attention_mask", "categories"):
        assert torch.equal(getattr(on_worker, name), getattr(reference, name)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decode needs a CUDA GPU")
def test_nvjpeg_decode_on_the_gpu_matches_the_cpu_decode(
    quirky_refer: QuirkyRefer, tokenizer: ExpressionTokenizer
) -> None:
    columns = _quirky_columns(quirky_refer)
    flips = flip_decisions(7, 1, columns["ref_id"], columns["sent_id"], 0.5)
    on_gpu = _device_decoded(columns, tokenizer, flips, "cuda")
    reference = collate_rows(columns, tokenizer, flips)
    assert on_gpu.images.is_cuda and on_gpu.masks.is_cuda
    difference = (on_gpu.images.cpu().int() - reference.images.int()).abs()
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels at edges
    assert difference.float().mean() < 1.0 and difference.max() <= 32
    assert torch.equal(on_gpu.masks.cpu(), reference.masks) and torch.equal(on_gpu.boxes.cpu(), reference.boxes)


def test_device_decode_needs_gpu_workers() -> None:
    with pytest.raises(ValueError, match=r"run\.use_gpu"):
        load_config(None, ["data.image_decode=device"])
    assert load_config(None, ["data.image_decode=device", "run.use_gpu=true"]).data.image_decode == "device"
    with pytest.raises(ValueError, match="image_decode"):
        load_config(None, ["data.image_decode=gpu"])


def test_flip_decisions_depend_on_seed_epoch_and_row_only() -> None:
    refs, sents = np.arange(400), np.arange(400) * 3
    first = flip_decisions(5, 2, refs, sents, 0.5)
    assert np.array_equal(first, flip_decisions(5, 2, refs, sents, 0.5))
    assert not np.array_equal(first, flip_decisions(5, 3, refs, sents, 0.5))
    assert not np.array_equal(first, flip_decisions(6, 2, refs, sents, 0.5))
    # a row's decision does not depend on the rows around it
    assert np.array_equal(flip_decisions(5, 2, refs[::-1], sents[::-1], 0.5), first[::-1])
    assert 160 < first.sum() < 240  # about half of 400
    assert not flip_decisions(5, 2, refs, sents, 0.0).any() and flip_decisions(5, 2, refs, sents, 1.0).all()


def test_a_stream_started_ahead_fetches_its_first_item_meanwhile_and_loses_nothing() -> None:
    fetched, threads = threading.Event(), []

    def stream():
        threads.append(threading.get_ident())
        fetched.set()
        yield from range(5)

    items = started_ahead(stream())
    assert fetched.wait(timeout=10)  # before anyone asked for an item
    assert list(items) == [0, 1, 2, 3, 4]
    assert threads[0] != threading.get_ident()  # the first fetch ran on another thread
    assert list(started_ahead(iter(()))) == []

    def broken():
        raise OSError("disk gone")
        yield  # pragma: no cover

    failing = started_ahead(broken())
    with pytest.raises(OSError, match="disk gone"):  # raised where the caller iterates
        next(failing)


def test_category_ids_must_fit_the_classifier(tmp_path) -> None:
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"category_id": pa.array([1, 5, 2], pa.int64())}), tmp_path / "train" / "part-0.parquet")
    manifest = {"schema_version": SCHEMA_VERSION, "splits": {"train": {"rows": 3, "files": ["part-0.parquet"]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    fits = load_config(None, [f"data.path={tmp_path}", "model.overrides={categories: 6}", "loss.category=1.0"])
    _check_categories(fits, 6)
    too_few = load_config(None, [f"data.path={tmp_path}", "model.overrides={categories: 5}", "loss.category=1.0"])
    with pytest.raises(ValueError, match=r"run from 1 to 5.*at least 6"):
        _check_categories(too_few, 5)


def test_the_category_loss_needs_the_classifier() -> None:
    with pytest.raises(ValueError, match=r"loss\.category needs the model's category classifier"):
        load_config(None, ["loss.category=1.0"])
    assert load_config(None, ["loss.category=1.0", "model.overrides={categories: 6}"]).loss.category == 1.0


def test_a_training_step_learns_the_referred_category() -> None:
    config = load_config(
        None, ["model.overrides={categories: 6}", "loss.category=1.0", "loss.attention=2.0", "optim.grad_clip=1.0"]
    )
    torch.manual_seed(0)
    model = build_model(config, vocab_size=64)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, steps_per_epoch=10, optim=config.optim)
    size = model.config.vision.image_size
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[:, 40:80, 40:80] = 1
    batch = TrainingBatch(
        images=torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8),
        input_ids=torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]),
        attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool),
        boxes=torch.tensor([[0.47, 0.47, 0.31, 0.31]] * 2),
        masks=masks,
        categories=torch.tensor([1, 5]),
    )
    criterion = GroundingLoss(config.loss)
    before = model.box_head.category.weight.detach().clone()
    losses = train_step(model, batch, criterion, optimizer, scheduler, config.optim.grad_clip)
    assert {"category", "attention", "loss_det", "loss_seg"} <= set(losses)
    assert not torch.equal(model.box_head.category.weight, before)
    expected = losses["loss_det"] + losses["loss_seg"] + config.loss.attention * losses["attention"]
    torch.testing.assert_close(losses["loss"], expected + losses["category"])
