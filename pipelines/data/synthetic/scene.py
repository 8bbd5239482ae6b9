"""Scenes of the synthetic dataset: coloured shapes on textured backgrounds, sampled and drawn.

A scene is a handful of non-overlapping :class:`SceneObject` s. Their attributes are drawn so that objects
often share a colour or a shape with another object (``share_prob``), which is what makes the expression
necessary to find the referent. Every shape is a polygon; the same polygon is drawn into the image and
written as the COCO segmentation, so masks are exact.

:data:`SHAPES` and :data:`COLOURS` are everything that can be drawn; a dataset uses a subset of each
(by default :data:`DEFAULT_SHAPES` and :data:`DEFAULT_PALETTE`, the original five of each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "DEFAULT_PALETTE",
    "DEFAULT_SHAPES",
    "SHAPES",
    "SIZES",
    "SceneObject",
    "render_scene",
    "sample_scene",
]

# Saturated, well-separated hues; backgrounds are low-saturation so shapes never blend in. Every pair lies at
# least 80 apart in RGB (the per-object jitter moves a colour by at most 18 per channel), and every colour's
# chroma (largest minus smallest channel) is at least 100 where a background's tint is at most 36; the tests
# check both. White, black and grey are left out on purpose: a light or dark background would swallow them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (145, 50, 185),
    "orange": (245, 125, 15),
    "cyan": (30, 195, 210),
    "pink": (240, 90, 185),
    "brown": (140, 80, 30),
}
DEFAULT_PALETTE: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "pentagon", "hexagon", "cross")
DEFAULT_SHAPES: tuple[str, ...] = SHAPES[:5]
# The cross's twelve corners, arms 2 * 0.3 wide for an arm length of 1 (measured from the centre).
_ARM = 0.3
_CROSS_OUTLINE: tuple[tuple[float, float], ...] = (
    (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM),
    (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM), (-_ARM, -1), (_ARM, -1), (_ARM, -_ARM),
)  # fmt: skip
# The default circumradius range of each size class, as a fraction of the image's shorter side. The gap
# between the classes keeps "small" and "big" unambiguous; the small class is still ~15 px across after
# letterboxing to 128.
SIZES: dict[str, tuple[float, float]] = {"small": (0.075, 0.095), "big": (0.14, 0.17)}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.

    Attributes:
        shape: One of :data:`SHAPES`.
        colour: One of :data:`COLOURS`.
        size: A size class (``small`` / ``big``), or None where the radius is drawn without classes.
        cx: Centre x in pixels.
        cy: Centre y in pixels.
        radius: Circumradius in pixels.
        angle: Rotation in radians.
    """

    shape: str
    colour: str
    size: str | None
    cx: float
    cy: float
    radius: float
    angle: float

    def polygon(self) -> list[tuple[float, float]]:
        """The outline as ``(x, y)`` vertices in pixels."""
        if self.shape == "circle":
            angles = [2 * math.pi * k / 40 for k in range(40)]
            radii = [self.radius] * 40
        elif self.shape == "square":
            angles = [self.angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
            radii = [self.radius] * 4
        elif self.shape == "diamond":
            angles = [self.angle + k * math.pi / 2 for k in range(4)]
            radii = [self.radius] * 4
        elif self.shape == "triangle":
            angles = [self.angle - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
            radii = [self.radius] * 3
        elif self.shape == "star":
            angles = [self.angle - math.pi / 2 + k * math.pi / 5 for k in range(10)]
            radii = [self.radius if k % 2 == 0 else 0.45 * self.radius for k in range(10)]
        elif self.shape == "pentagon":
            angles = [self.angle - math.pi / 2 + k * 2 * math.pi / 5 for k in range(5)]
            radii = [self.radius] * 5
        elif self.shape == "hexagon":
            angles = [self.angle + k * math.pi / 3 for k in range(6)]
            radii = [self.radius] * 6
        elif self.shape == "cross":
            corner = math.hypot(1.0, _ARM)  # the outer corners lie on the circumcircle
            angles = [self.angle + math.atan2(y, x) for x, y in _CROSS_OUTLINE]
            radii = [self.radius * math.hypot(x, y) / corner for x, y in _CROSS_OUTLINE]
        else:
            raise ValueError(f"unknown shape {self.shape!r}")
        return [(self.cx + r * math.cos(a), self.cy + r * math.sin(a)) for a, r in zip(angles, radii)]

    def area(self) -> float:
        """Area of :meth:`polygon` in square pixels (the shoelace formula)."""
        pts = self.polygon()
        return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))


def _sample_attributes(
    rng: np.random.Generator,
    count: int,
    share_prob: float,
    shapes: tuple[str, ...],
    palette: tuple[str, ...],
    size_names: tuple[str, ...],
) -> list[tuple[str, str, str | None]]:
    """Draws (shape, colour, size) triples; with ``share_prob`` one copies a shape or colour seen before.

    With no ``size_names`` the size is None and no size is drawn.
    """
    out: list[tuple[str, str, str | None]] = []
    for _ in range(count):
        shape = shapes[rng.integers(len(shapes))]
        colour = palette[rng.integers(len(palette))]
        size = size_names[rng.integers(len(size_names))] if size_names else None
        if out and rng.random() < share_prob:
            source = out[rng.integers(len(out))]
            if rng.random() < 0.5:
                shape = source[0]
            else:
                colour = source[1]
        out.append((shape, colour, size))
    return out


def sample_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    min_objects: int,
    max_objects: int,
    share_prob: float,
    *,
    shapes: tuple[str, ...] = DEFAULT_SHAPES,
    palette: tuple[str, ...] = DEFAULT_PALETTE,
    sizes: dict[str, tuple[float, float]] = SIZES,
    size_classes: bool = True,
) -> list[SceneObject]:
    """Samples non-overlapping objects; retries the layout until ``min_objects`` fit.

    Args:
        rng: Source of randomness (the scene is a pure function of its state).
        width: Image width in pixels.
        height: Image height in pixels.
        min_objects: Fewest objects in a scene.
        max_objects: Most objects in a scene.
        share_prob: Chance that an object copies the shape or colour of an earlier one.
        shapes: The shapes to draw from (names of :data:`SHAPES`).
        palette: The colours to draw from (names of :data:`COLOURS`).
        sizes: Circumradius range of each size class, as fractions of the shorter image side.
        size_classes: Draw a size class, then a radius within it; if false, draw the radius from the whole
            span of ``sizes`` (smallest to largest) and leave the objects' ``size`` None.

    Returns:
        The objects, in drawing order.
    """
    short = min(width, height)
    gap = 0.04 * short
    span = (min(lo for lo, _ in sizes.values()), max(hi for _, hi in sizes.values()))
    size_names = tuple(sizes) if size_classes else ()
    for _ in range(100):
        count = int(rng.integers(min_objects, max_objects + 1))
        objects: list[SceneObject] = []
        for shape, colour, size in _sample_attributes(rng, count, share_prob, shapes, palette, size_names):
            lo, hi = span if size is None else sizes[size]
            radius = float(rng.uniform(lo, hi)) * short
            for _ in range(60):
                cx = float(rng.uniform(radius + 2, width - radius - 2))
                cy = float(rng.uniform(radius + 2, height - radius - 2))
                if all(math.hypot(cx - o.cx, cy - o.cy) >= radius + o.radius + gap for o in objects):
                    # NOTE: squares and diamonds stay within 6 degrees of upright so they never look alike, and
                    # crosses likewise so that they never turn into an "x".
                    tilt = 0.1 if shape in ("square", "diamond", "cross") else 0.25
                    angle = float(rng.uniform(-tilt, tilt))
                    objects.append(SceneObject(shape, colour, size, cx, cy, radius, angle))
                    break
        if len(objects) >= min_objects:
            return objects
    raise RuntimeError(f"could not place {min_objects} objects in a {width}x{height} image")


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted base colour with a gradient and one of four textures, float ``[H, W, 3]``."""
    grey = rng.uniform(80, 180)
    base = grey + rng.uniform(-18, 18, size=3)  # low saturation: a tint, not a hue
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(theta) * xx / width + np.sin(theta) * yy / height) * rng.uniform(-40, 40)
    kind = rng.integers(4)
    if kind == 0:  # stripes
        period = rng.uniform(6, 24)
        phi = rng.uniform(0, 2 * math.pi)
        texture = 10 * np.sin(2 * math.pi * (np.cos(phi) * xx + np.sin(phi) * yy) / period)
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(8, 25))
        texture = 10.0 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1)
    elif kind == 2:  # smooth blobs: coarse noise upsampled
        coarse = rng.normal(0, 18, size=(height // 16 + 2, width // 16 + 2)).astype(np.float32)
        texture = np.asarray(
            Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC), np.float32
        )
    else:  # fine grain
        texture = rng.normal(0, 9, size=(height, width)).astype(np.float32)
    return base[None, None, :] + (ramp + texture)[:, :, None]


def render_scene(rng: np.random.Generator, objects: list[SceneObject], width: int, height: int) -> Image.Image:
    """Draws ``objects`` over a textured background, with per-object colour jitter and sensor noise."""
    canvas = Image.fromarray(np.clip(_background(rng, width, height), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        jitter = rng.integers(-18, 19, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj.colour], jitter))
        draw.polygon(obj.polygon(), fill=fill)
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 4, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
