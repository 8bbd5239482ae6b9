"""Named variants of the synthetic dataset: each a set of :class:`SyntheticConfig` field values that changes the task.

The image count and the seed are never part of a variant; they come from the caller. ``docs/data.md`` lists
each variant's objects, shapes, colours, expression kinds and measured chance level.
"""

from __future__ import annotations

from typing import Any

from pipelines.data.synthetic.dataset import SyntheticConfig

__all__ = ["VARIANTS", "variant_config"]

VARIANTS: dict[str, dict[str, Any]] = {
    # The grammar a user reported: "the second X from the left", "the only Y", "the bigger Z". Small images,
    # few objects, and no size classes: radii are drawn from one range (10-18 px, 20-36 px across), so
    # "bigger" and "smaller" are the only size words.
    "ordinal": {
        "image_width": 160,
        "image_height": 160,
        "min_objects": 3,
        "max_objects": 4,
        "shapes": ("circle", "square", "triangle"),
        "palette": ("red", "green", "blue", "yellow"),
        "small_radius": (0.0625, 0.08),
        "big_radius": (0.095, 0.1125),
        "size_classes": False,
        "share_prob": 0.8,
        "expression_families": ("ordinal", "comparative", "only"),
    },
    # Many smaller objects of every shape and colour, with the built-in grammar.
    "crowded": {
        "min_objects": 5,
        "max_objects": 8,
        "shapes": ("circle", "square", "triangle", "diamond", "star", "pentagon", "hexagon", "cross"),
        "palette": ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "brown"),
        "small_radius": (0.05, 0.065),
        "big_radius": (0.09, 0.11),
        "expression_families": ("attribute", "relation", "extreme"),
    },
    # Shapes and colours the built-in dataset never shows (disjoint from its sets), other size ranges, and
    # ordinals and comparatives beside plain attributes: a test of transfer to unseen words.
    "newlook": {
        "image_width": 256,
        "image_height": 256,
        "min_objects": 3,
        "max_objects": 5,
        "shapes": ("pentagon", "hexagon", "cross"),
        "palette": ("orange", "cyan", "pink", "brown"),
        "small_radius": (0.06, 0.08),
        "big_radius": (0.115, 0.14),
        "expression_families": ("attribute", "comparative", "ordinal"),
    },
}


def variant_config(name: str, **overrides: Any) -> SyntheticConfig:
    """The config of a named variant, with ``overrides`` (count, seed, or any field) on top.

    Raises:
        ValueError: If ``name`` is not in :data:`VARIANTS`, or the resulting config is invalid.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {name!r}; choose from {', '.join(VARIANTS)}")
    return SyntheticConfig(**{**VARIANTS[name], **overrides})
