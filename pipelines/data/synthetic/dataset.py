"""The built-in synthetic referring dataset, written in exactly the REFER layout.

::

    <out>/synthetic/refs(unc).p      pickled refs, as REFER writes them (ref file_name carries the ann_id)
    <out>/synthetic/instances.json   COCO images / annotations (polygon masks) / categories (one per shape)
    <out>/synthetic/generator.json   the config and statistics of the run (not part of REFER; informative)
    <out>/images/synthetic_<image_id>.jpg

Every later stage reads it with the ordinary REFER reader (``dataset="synthetic"``, ``split_by="unc"``,
image root ``<out>/images``). The output is a pure function of the config: each image draws from its own
generator seeded with ``(seed, image_index)``, and splits come from a permutation seeded with ``seed``.
See ``docs/data.md`` for the grammar and the chance level.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipelines.data.synthetic.language import DEFAULT_FAMILIES, FAMILIES, Query, expressions_for, render_text
from pipelines.data.synthetic.scene import (
    COLOURS,
    DEFAULT_PALETTE,
    DEFAULT_SHAPES,
    SHAPES,
    SIZES,
    SceneObject,
    render_scene,
    sample_scene,
)

__all__ = ["SPLITS", "SyntheticConfig", "generate_synthetic", "scene_from_annotations"]

SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")


@dataclass
class SyntheticConfig:
    """What to generate.

    Attributes:
        num_images: Number of images over all splits.
        seed: Seed; the same seed and config give byte-identical files.
        image_width: Width of every image in pixels.
        image_height: Height of every image in pixels.
        min_objects: Fewest shapes per image (at least 2).
        max_objects: Most shapes per image.
        refs_per_image: Most referred objects per image.
        sentences_per_ref: Most expressions per referred object.
        share_prob: Chance that a shape copies the colour or shape of an earlier one (makes language needed).
        split_fractions: Fractions of images in train / val / testA / testB.
        jpeg_quality: JPEG quality of the images.
        shapes: The shapes drawn (names of ``scene.SHAPES``); category ids are 1.. in this order.
        palette: The colours drawn (names of ``scene.COLOURS``).
        small_radius: Circumradius range of the "small" class, as fractions of the shorter image side.
        big_radius: Circumradius range of the "big" class; it must lie wholly above the small one.
        size_classes: Draw every object as small or big; if false, draw radii from the whole span of the two
            ranges and never use the words small and big (comparatives still can).
        expression_families: The kinds of expression generated (names of ``language.FAMILIES``; kept in that
            constant's order).
    """

    num_images: int = 300
    seed: int = 0
    image_width: int = 320
    image_height: int = 240
    min_objects: int = 3
    max_objects: int = 6
    refs_per_image: int = 3
    sentences_per_ref: int = 3
    share_prob: float = 0.7
    split_fractions: tuple[float, float, float, float] = (0.7, 0.1, 0.1, 0.1)
    jpeg_quality: int = 90
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    palette: tuple[str, ...] = DEFAULT_PALETTE
    small_radius: tuple[float, float] = SIZES["small"]
    big_radius: tuple[float, float] = SIZES["big"]
    size_classes: bool = True
    expression_families: tuple[str, ...] = DEFAULT_FAMILIES

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if min(self.image_width, self.image_height) < 64 or max(self.image_width, self.image_height) > 4096:
            raise ValueError(f"image size must be within 64..4096 px, got {self.image_width}x{self.image_height}")
        if not 2 <= self.min_objects <= self.max_objects <= 12:
            raise ValueError(f"need 2 <= min_objects <= max_objects <= 12, got {self.min_objects}..{self.max_objects}")
        if self.refs_per_image < 1 or self.sentences_per_ref < 1:
            raise ValueError("refs_per_image and sentences_per_ref must be >= 1")
        if not 0.0 <= self.share_prob <= 1.0:
            raise ValueError(f"share_prob must be within [0, 1], got {self.share_prob}")
        self.split_fractions = tuple(float(f) for f in self.split_fractions)  # type: ignore[assignment]
        if len(self.split_fractions) != len(SPLITS) or any(f < 0 for f in self.split_fractions):
            raise ValueError(f"split_fractions must be {len(SPLITS)} non-negative numbers")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {sum(self.split_fractions)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")
        self.shapes = _names("shapes", self.shapes, SHAPES)
        self.palette = _names("palette", self.palette, tuple(COLOURS))
        families = _names("expression_families", self.expression_families, FAMILIES)
        self.expression_families = tuple(f for f in FAMILIES if f in families)  # the order carries no meaning
        self.small_radius = _radius_range("small_radius", self.small_radius)
        self.big_radius = _radius_range("big_radius", self.big_radius)
        if self.small_radius[1] >= self.big_radius[0]:
            raise ValueError(
                f"size classes overlap: small_radius {self.small_radius} must end below big_radius {self.big_radius}"
            )
        if self.big_radius[1] > 0.25:
            raise ValueError(f"big_radius must stay within 0.25 of the shorter side to fit, got {self.big_radius}")
        if self.small_radius[0] * min(self.image_width, self.image_height) < 4:
            raise ValueError(f"small_radius {self.small_radius} gives shapes under 4 px in radius at this image size")

    @property
    def sizes(self) -> dict[str, tuple[float, float]]:
        """The size classes as the scene sampler takes them."""
        return {"small": self.small_radius, "big": self.big_radius}


def _names(field_name: str, value: tuple[str, ...] | str, known: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` as a tuple of distinct names from ``known`` (at least one)."""
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{field_name}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{field_name} must name at least one and none twice, got {names}")
    return names


def _radius_range(field_name: str, value: tuple[float, float]) -> tuple[float, float]:
    """``value`` as a (low, high) pair of floats with 0 < low <= high."""
    pair = [float(v) for v in value]
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        raise ValueError(
            f"{field_name} must be (low, high) fractions of the shorter side with 0 < low <= high, got {value}"
        )
    return pair[0], pair[1]


@dataclass
class _ImageRefs:
    """One generated image: its JPEG, objects, and the chosen (object index, expressions) pairs."""

    jpeg: bytes
    objects: list[SceneObject]
    refs: list[tuple[int, list[tuple[str, str]]]] = field(default_factory=list)  # (obj, [(kind, text)])


def _choose_sentences(found: dict[str, list[Query]], rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Picks up to ``count`` distinct expressions, cycling through the kinds so that a ref mixes them."""
    kinds = [k for k in found if found[k]]
    rng.shuffle(kinds)
    pools = {k: [found[k][j] for j in rng.permutation(len(found[k]))] for k in kinds}
    chosen: list[tuple[str, str]] = []
    while len(chosen) < count and any(pools.values()):
        for kind in kinds:
            if pools[kind] and len(chosen) < count:
                text = render_text(pools[kind].pop(), rng)
                if all(text != t for _, t in chosen):
                    chosen.append((kind, text))
    return chosen


def _make_image(index: int, config: SyntheticConfig) -> _ImageRefs:
    rng = np.random.default_rng([config.seed, index])
    w, h = config.image_width, config.image_height
    objects = sample_scene(
        rng,
        w,
        h,
        config.min_objects,
        config.max_objects,
        config.share_prob,
        shapes=config.shapes,
        palette=config.palette,
        sizes=config.sizes,
        size_classes=config.size_classes,
    )
    image = render_scene(rng, objects, w, h)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=config.jpeg_quality)
    out = _ImageRefs(jpeg=buf.getvalue(), objects=objects)
    for obj_index in rng.permutation(len(objects)):
        if len(out.refs) == config.refs_per_image:
            break
        found = expressions_for(int(obj_index), objects, config.expression_families)
        sentences = _choose_sentences(found, rng, config.sentences_per_ref)
        if sentences:
            out.refs.append((int(obj_index), sentences))
    return out


def _assign_splits(config: SyntheticConfig) -> list[str]:
    """Split of each image index: a seeded permutation cut by the fractions (each split >= 1 if possible)."""
    n = config.num_images
    counts = [round(f * n) for f in config.split_fractions]
    for i in range(1, len(counts)):  # held-out splits get at least one image when there is room
        if counts[i] == 0 and config.split_fractions[i] > 0 and n >= len(SPLITS):
            counts[i] = 1
    counts[0] = n - sum(counts[1:])
    order = np.random.default_rng([config.seed, 2**31 - 1]).permutation(n)
    splits = [""] * n
    start = 0
    for name, count in zip(SPLITS, counts):
        for i in order[start : start + count]:
            splits[int(i)] = name
        start += count
    return splits


def _annotation(ann_id: int, category_id: int, image_id: int, obj: SceneObject, w: int, h: int) -> dict[str, Any]:
    poly = [round(float(v), 2) for xy in obj.polygon() for v in xy]
    xs, ys = poly[0::2], poly[1::2]
    x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
    x1, y1 = min(float(w), max(xs)), min(float(h), max(ys))
    area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [poly],
        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        "area": area,
        "iscrowd": 0,
        # Not COCO: the generator's ground truth, so that tests can re-check every expression.
        "attributes": asdict(obj),
    }


def scene_from_annotations(annotations: list[dict[str, Any]]) -> list[SceneObject]:
    """Rebuilds an image's scene from its ``instances.json`` annotations (in annotation order)."""
    return [SceneObject(**ann["attributes"]) for ann in annotations]


def _made_images(config: SyntheticConfig, workers: int) -> Iterator[_ImageRefs]:
    """Every image of the dataset in index order, drawn in ``workers`` processes (each image has its own seed,
    so the result does not depend on how many)."""
    make = partial(_make_image, config=config)
    if workers <= 1:
        yield from map(make, range(config.num_images))
        return
    # NOTE: spawned, not forked: the caller may hold threads (Ray, torch) that a fork would copy mid-lock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(make, range(config.num_images), chunksize=max(1, config.num_images // (8 * workers)))


def generate_synthetic(
    out: str | Path, config: SyntheticConfig, overwrite: bool = False, workers: int = 1
) -> dict[str, Any]:
    """Generates the dataset under ``out`` and returns its statistics.

    Args:
        out: Output folder; ``synthetic/`` and ``images/`` are created inside it.
        config: What to generate.
        overwrite: Replace an existing dataset in ``out`` instead of refusing.
        workers: Processes that draw the images; the files are the same for any number.

    Returns:
        Counts per split and per expression kind (every kind of ``language.FAMILIES``, 0 where none was made),
        images without any referred object, and the chance level of a language-blind guess.

    Raises:
        FileExistsError: If ``out`` already holds a dataset and ``overwrite`` is false.
    """
    out = Path(out)
    ann_dir, img_dir = out / "synthetic", out / "images"
    if (ann_dir.exists() or img_dir.exists()) and not overwrite:
        raise FileExistsError(f"{out} already holds a synthetic dataset; pass overwrite (--overwrite) to replace it")
    for d in (ann_dir, img_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    splits = _assign_splits(config)
    images, annotations, refs = [], [], []
    stats: Counter[str] = Counter({f"kind/{kind}": 0 for kind in FAMILIES})
    category = {shape: i + 1 for i, shape in enumerate(config.shapes)}
    inverse_counts: list[float] = []
    shared = largest_hits = 0
    next_ann = next_ref = next_sent = 1
    for index, made in enumerate(_made_images(config, workers)):
        image_id = index + 1
        file_name = f"synthetic_{image_id:06d}.jpg"
        (img_dir / file_name).write_bytes(made.jpeg)
        w, h = config.image_width, config.image_height
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        ann_ids = list(range(next_ann, next_ann + len(made.objects)))
        next_ann += len(made.objects)
        annotations += [_annotation(a, category[o.shape], image_id, o, w, h) for a, o in zip(ann_ids, made.objects)]
        stats[f"images/{splits[index]}"] += 1
        stats["images_without_refs"] += int(not made.refs)
        for obj_index, sentences in made.refs:
            target = made.objects[obj_index]
            others = [o for j, o in enumerate(made.objects) if j != obj_index]
            shared += any(o.shape == target.shape or o.colour == target.colour for o in others)
            sentence_dicts = []
            for kind, text in sentences:
                sentence_dicts.append({"tokens": text.split(), "raw": text, "sent_id": next_sent, "sent": text})
                next_sent += 1
                stats[f"kind/{kind}"] += 1
                stats[f"expressions/{splits[index]}"] += 1
                inverse_counts.append(1.0 / len(made.objects))
                largest_hits += target.radius == max(o.radius for o in made.objects)
            refs.append(
                {
                    "ref_id": next_ref,
                    "ann_id": ann_ids[obj_index],
                    "image_id": image_id,
                    "category_id": category[target.shape],
                    "split": splits[index],
                    "sent_ids": [s["sent_id"] for s in sentence_dicts],
                    # REFER's quirk, kept on purpose: the ref's file_name is not the image file.
                    "file_name": f"synthetic_{image_id:06d}_{ann_ids[obj_index]}.jpg",
                    "sentences": sentence_dicts,
                }
            )
            next_ref += 1
            stats[f"refs/{splits[index]}"] += 1
    categories = [{"id": i, "name": s, "supercategory": "shape"} for s, i in category.items()]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    with open(ann_dir / "instances.json", "w", encoding="utf-8") as f:
        json.dump(instances, f, separators=(",", ":"))
    with open(ann_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    summary = {
        "config": asdict(config),
        "counts": {k: stats[k] for k in sorted(stats)},
        "refs_with_shared_shape_or_colour": shared / max(1, len(refs)),
        "chance_uniform_object": float(np.mean(inverse_counts)) if inverse_counts else 0.0,
        "blind_largest_object": largest_hits / max(1, len(inverse_counts)),
        "mean_objects_per_image": len(annotations) / config.num_images,
    }
    with open(ann_dir / "generator.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary
