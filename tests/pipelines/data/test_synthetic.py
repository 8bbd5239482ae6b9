"""Synthetic dataset: determinism, disjoint splits, REFER layout, unambiguous expressions, speed."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from jobs.synth import main as synth_main
from pipelines.data.refer import ReferDataset, ReferSource
from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic, scene_from_annotations
from pipelines.data.synthetic.language import denotes_uniquely, parse

CONFIG = SyntheticConfig(num_images=40, seed=7)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, CONFIG)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(synthetic_root: Path, tmp_path: Path) -> None:
    generate_synthetic(tmp_path, CONFIG)
    assert _files(tmp_path) == _files(synthetic_root)
    other = tmp_path / "other"
    generate_synthetic(other, SyntheticConfig(num_images=40, seed=8))
    assert _files(other)["synthetic/refs(unc).p"] != _files(synthetic_root)["synthetic/refs(unc).p"]


def test_splits_are_disjoint_by_image_and_all_present(synthetic_root: Path) -> None:
    ds = ReferDataset.load(ReferSource(synthetic_root, "synthetic", "unc", synthetic_root / "images"))
    images_per_split: dict[str, set[int]] = defaultdict(set)
    for e in ds:
        images_per_split[e.split].add(e.image_id)
    assert set(images_per_split) == {"train", "val", "testA", "testB"}
    splits = list(images_per_split.values())
    for i in range(len(splits)):
        for j in range(i + 1, len(splits)):
            assert not splits[i] & splits[j]
    assert not ds.problems


def test_every_expression_denotes_its_object_uniquely(synthetic_root: Path) -> None:
    instances = json.loads((synthetic_root / "synthetic" / "instances.json").read_text())
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in instances["annotations"]:
        by_image[ann["image_id"]].append(ann)
    ds = ReferDataset.load(ReferSource(synthetic_root, "synthetic", "unc", synthetic_root / "images"))
    sentences_per_ref: dict[int, int] = defaultdict(int)
    for e in ds:
        anns = by_image[e.image_id]
        target = [a["id"] for a in anns].index(e.ann_id)
        assert denotes_uniquely(parse(e.expression), scene_from_annotations(anns), target), e.expression
        sentences_per_ref[e.ref_id] += 1
    assert max(sentences_per_ref.values()) >= 2  # several sentences per object


def test_language_is_needed(synthetic_root: Path) -> None:
    stats = json.loads((synthetic_root / "synthetic" / "generator.json").read_text())
    assert stats["refs_with_shared_shape_or_colour"] > 0.75
    assert stats["chance_uniform_object"] < 0.35


def test_polygon_masks_cover_the_drawn_shapes(synthetic_root: Path) -> None:
    coco = COCO(str(synthetic_root / "synthetic" / "instances.json"))
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[1])):
        mask = coco.annToMask(ann).astype(bool)
        _, _, w, h = ann["bbox"]
        assert mask.sum() > 0.3 * w * h  # a filled shape, not a sliver
        assert abs(ann["attributes"]["cx"] - np.nonzero(mask)[1].mean()) < 3


def test_a_few_hundred_images_generate_in_seconds(tmp_path: Path) -> None:
    started = time.perf_counter()
    assert synth_main(["--out", str(tmp_path), "--images", "200", "--seed", "1", "--image-size", "320x240"]) == 0
    assert time.perf_counter() - started < 20
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 200
    assert synth_main(["--out", str(tmp_path)]) == 1  # refuses to overwrite without --overwrite
