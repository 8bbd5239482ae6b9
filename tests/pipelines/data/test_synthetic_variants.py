"""Synthetic dataset variants and options: determinism, what the options change, and every expression read
back by an independent reader (synthetic_resolver.py), plus hand-built scenes where that reading must fail."""

from __future__ import annotations

import json
import pickle
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.data.synthetic import language
from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic, scene_from_annotations
from pipelines.data.synthetic.language import denotes_uniquely, parse, resolve
from pipelines.data.synthetic.scene import COLOURS, SceneObject
from pipelines.data.synthetic.variants import VARIANTS, variant_config
from tests.pipelines.data.synthetic_resolver import UNIT_AREA, UnreadableExpression, denotations, read

IMAGES = 150
# The reader's kinds, by the generator's family names.
READER_KIND = {
    "attribute": "attribute",
    "relation": "relation",
    "extreme": "superlative",
    "ordinal": "ordinal",
    "comparative": "comparative",
    "only": "only",
}
# One config per new option, each changing only that option.
OPTIONS: dict[str, dict[str, Any]] = {
    "shapes": {"shapes": ("hexagon", "circle", "cross")},
    "palette": {"palette": ("orange", "cyan", "red")},
    "radius": {"small_radius": (0.05, 0.07), "big_radius": (0.1, 0.12)},
    "no-size-classes": {"size_classes": False},
    "families": {"expression_families": ("ordinal", "comparative", "only")},
}


def _config(name: str, **fields: Any) -> SyntheticConfig:
    if name == "default":
        return SyntheticConfig(**fields)
    if name in VARIANTS:
        return variant_config(name, **fields)
    return SyntheticConfig(**OPTIONS[name], **fields)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in default and every variant, IMAGES images each, seed 0."""
    out = {}
    for name in ("default", *VARIANTS):
        out[name] = tmp_path_factory.mktemp(name)
        generate_synthetic(out[name], _config(name, num_images=IMAGES, seed=0))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path) -> tuple[dict[int, list[dict]], list[dict], dict]:
    """Annotations by image, refs, and generator.json."""
    instances = json.loads((root / "synthetic" / "instances.json").read_text())
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in instances["annotations"]:
        by_image[ann["image_id"]].append(ann)
    with open(root / "synthetic" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    return by_image, refs, json.loads((root / "synthetic" / "generator.json").read_text())


@pytest.mark.parametrize("name", [*VARIANTS, *OPTIONS])
def test_same_seed_same_files_other_seed_other_files(name: str, tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", _config(name, num_images=12, seed=3))
    generate_synthetic(tmp_path / "b", _config(name, num_images=12, seed=3))
    generate_synthetic(tmp_path / "c", _config(name, num_images=12, seed=4))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    a, c = _files(tmp_path / "a"), _files(tmp_path / "c")
    assert a["synthetic/refs(unc).p"] != c["synthetic/refs(unc).p"]
    assert a["images/synthetic_000001.jpg"] != c["images/synthetic_000001.jpg"]


def test_the_order_of_the_families_does_not_matter(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", SyntheticConfig(num_images=12))
    reordered = SyntheticConfig(num_images=12, expression_families=("extreme", "attribute", "relation"))
    generate_synthetic(tmp_path / "b", reordered)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


@pytest.mark.parametrize("name", [*VARIANTS, *OPTIONS])
def test_the_options_shape_every_scene(name: str, tmp_path: Path) -> None:
    config = _config(name, num_images=20, seed=1)
    generate_synthetic(tmp_path, config)
    by_image, refs, stats = _load(tmp_path)
    instances = json.loads((tmp_path / "synthetic" / "instances.json").read_text())
    assert [c["name"] for c in instances["categories"]] == list(config.shapes)
    short = min(config.image_width, config.image_height)
    for anns in by_image.values():
        assert config.min_objects <= len(anns) <= config.max_objects
        for ann in anns:
            attrs = ann["attributes"]
            assert attrs["shape"] == config.shapes[ann["category_id"] - 1]
            assert attrs["colour"] in config.palette
            if config.size_classes:
                lo, hi = config.sizes[attrs["size"]]
            else:
                assert attrs["size"] is None
                lo, hi = config.small_radius[0], config.big_radius[1]
            assert lo * short - 1e-6 <= attrs["radius"] <= hi * short + 1e-6
    kinds = {read(s["sent"]).kind for r in refs for s in r["sentences"]}
    assert kinds <= {READER_KIND[f] for f in config.expression_families}
    assert set(k.removeprefix("kind/") for k in stats["counts"] if k.startswith("kind/")) == set(READER_KIND)
    if not config.size_classes:
        assert not any(w in s["tokens"] for r in refs for s in r["sentences"] for w in ("small", "big"))


@pytest.mark.parametrize("name", ["default", *VARIANTS])
def test_an_independent_reader_finds_exactly_the_referred_object(name: str, roots: dict[str, Path]) -> None:
    by_image, refs, stats = _load(roots[name])
    config = _config(name, num_images=IMAGES)
    kinds: Counter[str] = Counter()
    for ref in refs:
        anns = by_image[ref["image_id"]]
        target = [a["id"] for a in anns].index(ref["ann_id"])
        objects = [a["attributes"] for a in anns]
        for sentence in ref["sentences"]:
            text = sentence["sent"]
            assert denotations(text, objects) == [target], text
            assert denotes_uniquely(parse(text), scene_from_annotations(anns), target), text
            kinds[read(text).kind] += 1
    # Every requested kind of expression is made, and in the counts generator.json reports.
    assert set(kinds) == {READER_KIND[f] for f in config.expression_families}
    for family in config.expression_families:
        assert stats["counts"][f"kind/{family}"] == kinds[READER_KIND[family]] > 0.05 * IMAGES, family
    # Most images have a referred object, and a language-blind guess stays well below one half.
    assert stats["counts"]["images_without_refs"] < 0.05 * IMAGES
    assert stats["chance_uniform_object"] < 0.35


def test_the_reader_areas_match_the_drawn_masks(roots: dict[str, Path]) -> None:
    by_image, _, _ = _load(roots["crowded"])
    seen = set()
    for anns in by_image.values():
        for ann in anns:
            attrs = ann["attributes"]
            expected = UNIT_AREA[attrs["shape"]] * attrs["radius"] ** 2
            assert ann["area"] == pytest.approx(expected, rel=0.08), attrs
            seen.add(attrs["shape"])
    assert seen == set(UNIT_AREA)


def test_the_new_shapes_are_drawn_where_their_masks_are(roots: dict[str, Path]) -> None:
    root = roots["newlook"]  # pentagons, hexagons, crosses in colours the default never uses
    instances = json.loads((root / "synthetic" / "instances.json").read_text())
    by_image = defaultdict(list)
    for ann in instances["annotations"]:
        by_image[ann["image_id"]].append(ann)
    for image in instances["images"][:5]:
        pixels = np.asarray(Image.open(root / "images" / image["file_name"]), dtype=np.float32)
        for ann in by_image[image["id"]]:
            rle = mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"])
            mask = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
            inside = np.median(pixels[mask], axis=0)  # the median ignores JPEG ringing along the edge
            assert np.abs(inside - COLOURS[ann["attributes"]["colour"]]).max() < 30, ann["attributes"]


def test_the_reader_catches_a_generator_that_allows_borderline_cases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A generator with a twentieth of its margins and no clear size ratio: the reader must object.
    monkeypatch.setattr(language, "_margin", lambda a, b: 0.05 * (a.radius + b.radius))
    monkeypatch.setattr(language, "CLEAR_RATIO", 1.02)
    generate_synthetic(tmp_path, variant_config("ordinal", num_images=30, seed=0))
    by_image, refs, _ = _load(tmp_path)
    wrong: Counter[str] = Counter()
    for ref in refs:
        anns = by_image[ref["image_id"]]
        target = [a["id"] for a in anns].index(ref["ann_id"])
        for sentence in ref["sentences"]:
            if denotations(sentence["sent"], [a["attributes"] for a in anns]) != [target]:
                wrong[read(sentence["sent"]).kind] += 1
    assert wrong["ordinal"] > 0 and wrong["comparative"] > 0


# ---- hand-built scenes: the reading can fail, and the new kinds mean what they say -------------------------


def _obj(shape: str, colour: str, cx: float, cy: float = 50.0, radius: float = 10.0, size: str | None = None) -> dict:
    return {"shape": shape, "colour": colour, "size": size, "cx": cx, "cy": cy, "radius": radius, "angle": 0.0}


def _both(text: str, objects: list[dict]) -> tuple[list[int], list[int]]:
    """The independent reading and the generator's lenient one."""
    return denotations(text, objects), resolve(parse(text), [SceneObject(**o) for o in objects])


def test_ambiguous_expressions_resolve_to_several_objects() -> None:
    objects = [_obj("circle", "red", 40.0), _obj("circle", "red", 42.0, cy=90.0), _obj("square", "blue", 120.0)]
    assert _both("the leftmost red circle", objects) == ([0, 1], [0, 1])  # 2 px apart: a tie
    assert _both("the red circle", objects) == ([0, 1], [0, 1])
    assert _both("the only circle", objects) == ([0, 1], [0, 1])
    assert _both("the circle left of the blue square", objects) == ([0, 1], [0, 1])
    assert _both("the second circle from the top", objects) == ([1], [1])
    objects.append(_obj("square", "blue", 160.0))  # the anchor is no longer unique: both circles stay
    assert _both("the red circle left of the blue square", objects) == ([0, 1], [0, 1])
    scene = [SceneObject(**o) for o in objects]
    assert not denotes_uniquely(parse("the leftmost red circle"), scene, 0)


def test_ordinals_count_from_the_named_side_and_refuse_near_ties() -> None:
    # Four circles, listed out of order, at x = 100, 20, 140, 60 (radius 10: the margin is 10).
    objects = [_obj("circle", "red", x) for x in (100.0, 20.0, 140.0, 60.0)]
    scene = [SceneObject(**o) for o in objects]
    for text, expected in (
        ("the second circle from the left", 3),  # x = 60
        ("the third circle from the left", 0),  # x = 100
        ("the second circle from the right", 0),  # x = 100
        ("the third circle from the right", 3),  # x = 60
        ("the second red shape from the left", 3),
    ):
        assert _both(text, objects) == ([expected], [expected]), text
        assert denotes_uniquely(parse(text), scene, expected), text
    # The third from the left moves to x = 63, 3 px from the second: both readings see a tie.
    objects[0]["cx"] = 63.0
    assert _both("the third circle from the left", objects) == ([0, 3], [0, 3])
    # At x = 67 the reader (tie under 5 px) tells them apart, but the generator (margin 10 px) never says it.
    objects[0]["cx"] = 67.0
    assert denotations("the third circle from the left", objects) == [0]
    assert not denotes_uniquely(parse("the third circle from the left"), [SceneObject(**o) for o in objects], 0)
    assert _both("the second circle from the top", objects) == ([0, 1, 2, 3], [0, 1, 2, 3])  # all level


def test_comparatives_need_two_matches_clearly_apart_in_size() -> None:
    squares = [_obj("square", "red", 30.0, radius=10.0), _obj("square", "red", 90.0, radius=14.0)]
    scene = [SceneObject(**o) for o in squares]
    assert _both("the bigger square", squares) == ([1], [1])
    assert _both("the larger red shape", squares) == ([1], [1])
    assert _both("the smaller square", squares) == ([0], [0])
    assert denotes_uniquely(parse("the bigger square"), scene, 1)
    squares[1]["radius"] = 12.0  # a ratio of 1.2: the generator will not call either one bigger
    assert not denotes_uniquely(parse("the bigger square"), [SceneObject(**o) for o in squares], 1)
    # A circle of radius 13 covers more than a triangle of radius 18 (531 vs 421 px^2): neither is "bigger",
    # though the triangle's corners reach further.
    mixed = [_obj("circle", "blue", 30.0, radius=13.0), _obj("triangle", "blue", 90.0, radius=18.0)]
    assert _both("the bigger blue shape", mixed) == ([0, 1], [0, 1])
    three = [*squares, _obj("square", "red", 150.0, radius=20.0)]
    assert _both("the bigger square", three) == ([0, 1, 2], [0, 1, 2])  # "bigger" of three: no referent


@pytest.mark.parametrize(
    "text",
    [
        "the second circle",
        "the circle from the left",
        "the leftmost circle from the left",
        "a red circle",
        "the red circle left of",
        "the red circle near the square",
        "the mauve circle",
        "the big",
        "the only red circle above the square",
        "the  red circle",
    ],
)
def test_text_outside_the_grammar_is_refused(text: str) -> None:
    with pytest.raises(UnreadableExpression):
        read(text)
    with pytest.raises(ValueError, match="not a synthetic expression"):
        parse(text)
