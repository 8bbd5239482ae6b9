"""Synthetic dataset: determinism, the pinned default output, disjoint splits, REFER layout, unambiguous
expressions, option checks, speed. Variants and the new options: test_synthetic_variants.py."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from jobs.synth import build_parser, config_from_args
from jobs.synth import main as synth_main
from pipelines.data.refer import ReferDataset, ReferSource
from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic, scene_from_annotations
from pipelines.data.synthetic.language import denotes_uniquely, parse
from pipelines.data.synthetic.scene import COLOURS, SHAPES, SceneObject
from pipelines.data.synthetic.variants import VARIANTS, variant_config

CONFIG = SyntheticConfig(num_images=40, seed=7)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, CONFIG)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# NOTE: these SHA-256 digests were produced by the generator as it was *before* it had any options (shapes,
# palette, size ranges, size classes, expression families, variants), with the locked numpy 2.4.6 and
# Pillow 13.0.0 (JPEG bytes depend on Pillow's libjpeg). The options must leave the built-in default, and its
# random draws, exactly as they were. generator.json is left out: it reports the config, which gained fields.
PINNED = {
    "cli": (
        ["--images", "60", "--seed", "0", "--min-objects", "2", "--max-objects", "3"],
        {
            "synthetic/instances.json": "606aa916bfeb04e26a0427de399bd4d5b21a5ceb301a0b3f23b33943c76d3f3f",
            "synthetic/refs(unc).p": "c1247cb524fff1a04f30fd4fd97af4bb21018d24a0e6e1fc7026fd0e47a48caa",
            "images/synthetic_000001.jpg": "d2b84fbf373aef4679e3b43e7dc312e3855810bc4a882dad0a99ddcb2cd83006",
            "images/synthetic_000017.jpg": "d88a9e3710a675b2cddbc7a85264a54fefa74ff28be012fc60ad6898441648bd",
            "images/synthetic_000060.jpg": "63840dcaf20469595a1394086d468433f90601db63478bb1bf4cae3082f63cd9",
        },
    ),
    "config-defaults": (
        ["--images", "60"],
        {
            "synthetic/instances.json": "7297d3a633cac6ce6f702d589bcdaba69b0cf031d924d55f07e18b8ae918f7a6",
            "synthetic/refs(unc).p": "d3238533407b9c6a9991c869d11f734c212c4588913be656f32dd851fc0f12e9",
            "images/synthetic_000001.jpg": "78446f53ffd0c6f94ac168918d639ef492c9bf5bccb54909c938d5837d38739b",
            "images/synthetic_000017.jpg": "845284b42aa4040f2a34d4da057a159755d87d74dd963f817bc8d7802970d61b",
            "images/synthetic_000060.jpg": "a8e21fd00a740edbcfdbbdbf48ff23f6f61f95bc1133d04a4bc1a2130be13a0b",
        },
    ),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_the_default_output_is_what_it_was_before_options_existed(name: str, tmp_path: Path) -> None:
    args, digests = PINNED[name]
    out = tmp_path / "cli"
    assert synth_main(["--out", str(out), *args]) == 0
    if name == "config-defaults":  # the CLI's defaults are SyntheticConfig's
        generate_synthetic(tmp_path / "api", SyntheticConfig(num_images=60))
        assert _files(tmp_path / "api") == _files(out)
    got = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in digests}
    assert got == digests


def test_same_seed_gives_identical_files(synthetic_root: Path, tmp_path: Path) -> None:
    generate_synthetic(tmp_path, CONFIG)
    assert _files(tmp_path) == _files(synthetic_root)
    other = tmp_path / "other"
    generate_synthetic(other, SyntheticConfig(num_images=40, seed=8))
    assert _files(other)["synthetic/refs(unc).p"] != _files(synthetic_root)["synthetic/refs(unc).p"]


def test_images_drawn_in_several_processes_are_the_same_files(synthetic_root: Path, tmp_path: Path) -> None:
    generate_synthetic(tmp_path, CONFIG, workers=2)  # the fixture's dataset was drawn in this process
    assert _files(tmp_path) == _files(synthetic_root)


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


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"shapes": ("circle", "blob")}, "shapes: unknown 'blob'; choose from circle, square"),
        ({"shapes": ()}, "shapes must name at least one"),
        ({"shapes": ("circle", "circle")}, "none twice"),
        ({"palette": ("red", "mauve")}, "palette: unknown 'mauve'; choose from red, green"),
        ({"small_radius": (0.1, 0.15)}, "size classes overlap: small_radius"),
        ({"big_radius": (0.09, 0.2)}, "size classes overlap"),
        ({"small_radius": (0.09, 0.08)}, "0 < low <= high"),
        ({"small_radius": (0.075,)}, "small_radius must be \\(low, high\\)"),
        ({"big_radius": (0.2, 0.3)}, "big_radius must stay within 0.25"),
        ({"small_radius": (0.01, 0.02)}, "under 4 px"),
        ({"expression_families": ("attribute", "counting")}, "expression_families: unknown 'counting'"),
        ({"expression_families": ()}, "expression_families must name at least one"),
        ({"max_objects": 13}, "max_objects <= 12"),
    ],
)
def test_invalid_options_raise_a_clear_error(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**fields)


def test_unknown_variant_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        synth_main(["--out", "/tmp/never-written", "--variant", "sparse"])
    assert exit_info.value.code == 2
    assert (
        "--variant: invalid choice: 'sparse' (choose from 'ordinal', 'crowded', 'newlook')" in capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="unknown synthetic variant 'sparse'; choose from ordinal, crowded"):
        variant_config("sparse")
    assert synth_main(["--out", "/tmp/never-written", "--shapes", "circle,blob"]) == 2
    assert "shapes: unknown 'blob'" in capsys.readouterr().err


def test_explicit_flags_override_the_variant() -> None:
    args = ["--out", "x", "--variant", "ordinal", "--max-objects", "6", "--palette", "red,cyan", "--image-size", "200"]
    config = config_from_args(build_parser().parse_args(args))
    assert (config.max_objects, config.palette, config.image_width, config.image_height) == (
        6,
        ("red", "cyan"),
        200,
        200,
    )
    assert config.shapes == VARIANTS["ordinal"]["shapes"] and config.size_classes is False
    assert config.min_objects == VARIANTS["ordinal"]["min_objects"]
    assert config_from_args(build_parser().parse_args(["--out", "x"])) == SyntheticConfig()
    assert config_from_args(build_parser().parse_args(["--out", "x", "--variant", "crowded", "--size-classes"])) == (
        variant_config("crowded", num_images=300, seed=0)
    )


def test_colours_stay_apart_from_each_other_and_from_the_backgrounds() -> None:
    # Jitter moves a colour by up to 18 per channel; a background's tint spans at most 36 between channels.
    for (a, ca), (b, cb) in itertools.combinations(COLOURS.items(), 2):
        assert math.dist(ca, cb) >= 80, (a, b)
    for name, rgb in COLOURS.items():
        assert max(rgb) - min(rgb) >= 100, name


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_a_closed_polygon_on_its_circumcircle(shape: str) -> None:
    obj = SceneObject(shape, "red", "big", 50.0, 40.0, 20.0, 0.05)
    distances = [math.hypot(x - 50.0, y - 40.0) for x, y in obj.polygon()]
    assert max(distances) == pytest.approx(20.0)
    assert 0.3 * 20.0**2 < obj.area() <= math.pi * 20.0**2
