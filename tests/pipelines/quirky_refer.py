"""A REFER dataset with real-world quirks, built on the fly for the data-layer tests."""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

LONG_EXPRESSION = " ".join(["the very long and winding description of the big yellow thing"] * 40)
UNICODE_EXPRESSION = "the café’s chair — 左边的椅子 🙂"
# A Python 2 pickle of UTF-8 bytes arrives latin1-decoded; the reader must repair it.
MOJIBAKE = "naïve man".encode().decode("latin1")


@dataclass
class QuirkyRefer:
    """Where the quirky dataset lives and what a correct reader/preprocessor must make of it."""

    refer_root: Path
    image_root: Path
    instances: dict[str, Any]
    # (ref_id, sent_id) -> (split, expression, ann_id, image_id) for every expression that must survive
    expected: dict[tuple[int, int], tuple[str, str, int, int]] = field(default_factory=dict)
    # sent_ids that must be skipped, with a word their reason must contain
    lost: dict[int, str] = field(default_factory=dict)
    total_sentences: int = 0


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd format: column-major run lengths starting with a run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _save(img: Image.Image, path: Path, **kwargs: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def _gradient(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], -1).astype(np.uint8)


def build_quirky_refer(root: Path) -> QuirkyRefer:
    """Writes ``root/refer/refcoco/{refs(unc).p, instances.json}`` and ``root/images/...``."""
    image_root = root / "images"
    refer_root = root / "refer"
    (refer_root / "refcoco").mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []

    def add_image(image_id: int, file_name: str, w: int, h: int) -> None:
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})

    def add_poly(ann_id: int, image_id: int, parts: list[list[float]], crowd: int = 0) -> None:
        xs = [v for p in parts for v in p[0::2]]
        ys = [v for p in parts for v in p[1::2]]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        annotations.append(
            {"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": parts, "bbox": bbox,
             "iscrowd": crowd, "area": 1.0}
        )  # fmt: skip

    def add_rle(ann_id: int, image_id: int, rle: dict[str, Any], crowd: int) -> None:
        if isinstance(rle["counts"], str):  # compressed: pycocotools takes it as is, with bytes counts
            encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        else:
            encoded = mask_utils.frPyObjects(rle, *rle["size"])
        bbox = mask_utils.toBbox(encoded).tolist()
        annotations.append(
            {"id": ann_id, "image_id": image_id, "category_id": 2, "segmentation": rle, "bbox": bbox,
             "iscrowd": crowd, "area": 1.0}
        )  # fmt: skip

    # 1: RGB JPEG, a two-part polygon (an occluded object) and a plain one.
    _save(Image.fromarray(_gradient(64, 48)), image_root / "COCO_train2014_000000000001.jpg", quality=95)
    add_image(1, "COCO_train2014_000000000001.jpg", 64, 48)
    add_poly(101, 1, [[2, 2, 30, 2, 30, 20, 2, 20], [40, 10, 60, 10, 60, 40, 40, 40, 35, 25]])
    add_poly(102, 1, [[10, 25, 30, 25, 20, 45]])
    # 2: greyscale JPEG, crowd annotation as uncompressed RLE.
    _save(Image.fromarray(_gradient(40, 30)[..., 0], "L"), image_root / "grey.jpg", quality=95)
    add_image(2, "grey.jpg", 40, 30)
    crowd = np.zeros((30, 40), np.uint8)
    crowd[5:25, 3:20] = 1
    crowd[10:15, 25:38] = 1
    add_rle(201, 2, _uncompressed_rle(crowd), crowd=1)
    # 3: CMYK JPEG, compressed-RLE segmentation (as in refclef).
    _save(Image.fromarray(_gradient(50, 40)).convert("CMYK"), image_root / "cmyk.jpg", quality=95)
    add_image(3, "cmyk.jpg", 50, 40)
    blob = np.zeros((40, 50), np.uint8)
    blob[8:30, 10:45] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    add_rle(301, 3, {"size": [40, 50], "counts": compressed["counts"].decode("ascii")}, crowd=0)
    # 4: palette PNG with a transparent index, in a sub-folder.
    pal = Image.new("P", (60, 60), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    ImageDraw.Draw(pal).rectangle([10, 10, 40, 40], fill=1)
    _save(pal, image_root / "sub" / "palette.png", transparency=2)
    add_image(4, "sub/palette.png", 60, 60)
    add_poly(401, 4, [[10, 10, 41, 10, 41, 41, 10, 41]])
    # 5: RGBA PNG; second annotation does not decode (a two-point "polygon").
    rgba = np.dstack([_gradient(45, 45), np.full((45, 45), 255, np.uint8)])
    rgba[:, :10, 3] = 0
    _save(Image.fromarray(rgba, "RGBA"), image_root / "alpha.png")
    add_image(5, "alpha.png", 45, 45)
    add_poly(501, 5, [[12, 5, 40, 5, 40, 40, 12, 40]])
    annotations.append(
        {"id": 502, "image_id": 5, "category_id": 1, "segmentation": [[1, 1, 5, 5]], "bbox": [1, 1, 4, 4],
         "iscrowd": 0, "area": 0.0}
    )  # fmt: skip
    # 6: 37 x 500 and 7: 1024 x 200 (extreme aspect ratios), 8: 16-bit greyscale PNG.
    _save(Image.fromarray(_gradient(37, 500)), image_root / "tall.png")
    add_image(6, "tall.png", 37, 500)
    add_poly(601, 6, [[3, 40, 34, 40, 34, 460, 3, 460]])
    _save(Image.fromarray(_gradient(1024, 200)), image_root / "wide.jpg", quality=90)
    add_image(7, "wide.jpg", 1024, 200)
    add_poly(701, 7, [[100, 20, 900, 30, 950, 180, 80, 170]])
    deep = (np.linspace(0, 65535, 30 * 20).reshape(20, 30)).astype(np.uint16)
    _save(Image.fromarray(deep), image_root / "deep.png")  # uint16 -> mode I;16
    add_image(8, "deep.png", 30, 20)
    add_poly(801, 8, [[2, 2, 28, 2, 28, 18, 2, 18]])
    # 9: missing file, 10: truncated JPEG, 11: a file name that escapes the image root.
    add_image(9, "missing.jpg", 64, 48)
    add_poly(901, 9, [[2, 2, 30, 2, 30, 20]])
    buf = io.BytesIO()
    Image.fromarray(_gradient(64, 48)).save(buf, format="JPEG", quality=95)
    (image_root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    add_image(10, "truncated.jpg", 64, 48)
    add_poly(1001, 10, [[2, 2, 30, 2, 30, 20]])
    _save(Image.fromarray(_gradient(64, 48)), root / "outside.jpg")  # exists, so only the refusal can stop it
    add_image(11, "../outside.jpg", 64, 48)
    add_poly(1101, 11, [[2, 2, 30, 2, 30, 20]])

    q = QuirkyRefer(refer_root, image_root, {"images": images, "annotations": annotations, "categories": []})
    refs: list[dict[str, Any]] = []
    sent_id = 1000
    # (ref_id, ann_id, image_id, split, expressions, lost reason or None)
    plan = [
        (1, 101, 1, "train", ["the two-part thing", "the occluded box", "left object"], None),
        (2, 102, 1, "val", ["the triangle", MOJIBAKE], None),
        (3, 201, 2, "train", ["the crowd of people", UNICODE_EXPRESSION], None),
        (4, 301, 3, "testA", ["the rle blob"], None),
        (5, 401, 4, "testB", ["the red square", "square"], None),
        (6, 501, 5, "train", ["visible part"], None),
        (7, 502, 5, "train", ["a broken annotation"], "annotation"),
        (8, 601, 6, "val", ["the tall thing", LONG_EXPRESSION], None),
        (9, 701, 7, "testA", ["the wide band"], None),
        (10, 801, 8, "testB", ["deep grey"], None),
        (11, 901, 9, "train", ["in the missing image", "again"], "not found"),
        (12, 1001, 10, "train", ["in the truncated image"], "decode"),
        (13, 1101, 11, "val", ["outside the root"], "escapes"),
        (14, 99999, 1, "train", ["an annotation nobody has"], "not in instances"),
    ]
    for ref_id, ann_id, image_id, split, texts, reason in plan:
        sentences = []
        for text in texts:
            sent_id += 1
            sentences.append({"tokens": text.split(), "raw": text, "sent": text.lower(), "sent_id": sent_id})
            fixed = text.encode("latin1").decode("utf-8") if text is MOJIBAKE else text
            if reason is None:
                q.expected[(ref_id, sent_id)] = (split, fixed, ann_id, image_id)
            else:
                q.lost[sent_id] = reason
        refs.append(
            {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
             "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
             # REFER's quirk: the ref's file_name is the image name with the ann_id appended.
             "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"}
        )  # fmt: skip
        q.total_sentences += len(sentences)
    with open(refer_root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (refer_root / "refcoco" / "instances.json").write_text(json.dumps(q.instances), encoding="utf-8")
    return q
