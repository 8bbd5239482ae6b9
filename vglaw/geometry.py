"""Letterbox geometry: aspect-preserving resize + pad to a square canvas, its exact inverse, and flips.

Every image enters the model as a ``size x size`` canvas (448 for VG-LAW): the image is scaled so that its
longer side equals ``size`` and is centred on a black square. :class:`Letterbox` records that mapping once
per image and moves images, boxes and masks between the *original* pixel frame and the *canvas* frame.

Conventions:
    * Boxes are continuous pixel coordinates: ``[x0, y0, x1, y1]`` with the image spanning ``[0, W]``.
      Pixel ``i`` covers ``[i, i + 1)`` and has its centre at ``i + 0.5``; the same convention is used by
      PIL's resize and by ``F.interpolate(..., align_corners=False)``, so boxes and masks stay aligned.
    * Box functions accept numpy arrays or torch tensors of shape ``[..., 4]`` and return the same type.
    * The model's box output is ``(cx, cy, w, h)`` normalised by ``size`` (the padded canvas).

Horizontal flip is applied on the canvas (after the letterbox); ``left`` and ``right`` in the expression
are swapped with :func:`swap_spatial_words` so that the sentence still describes the flipped image.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

from vglaw.images import to_rgb8

if TYPE_CHECKING:
    import torch

__all__ = [
    "Letterbox",
    "cxcywh_to_xyxy",
    "hflip_box_cxcywh_normalized",
    "hflip_box_xyxy",
    "hflip_image",
    "hflip_mask",
    "hflip_sample",
    "swap_spatial_words",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")
ImageT = TypeVar("ImageT", Image.Image, "torch.Tensor")


def _is_tensor(x: Any) -> bool:
    """True for a torch tensor. Never imports torch: if it is not loaded, ``x`` cannot be one.

    NOTE: so that the data pipeline, which only letterboxes PIL images and numpy masks, starts its worker
    processes without paying for ``import torch``.
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


# --------------------------------------------------------------------------------------------------
# Box format conversions (numpy or torch, shape [..., 4])
# --------------------------------------------------------------------------------------------------


def _as_float(box: ArrayT) -> ArrayT:
    """Returns ``box`` as a floating array/tensor, checking the trailing dimension."""
    if _is_tensor(box):
        out = box if box.is_floating_point() else box.float()
    elif isinstance(box, np.ndarray):
        out = box if np.issubdtype(box.dtype, np.floating) else box.astype(np.float64)
    else:
        raise TypeError(f"expected a numpy array or torch tensor, got {type(box).__name__}")
    if out.ndim == 0 or out.shape[-1] != 4:
        raise ValueError(f"expected boxes of shape [..., 4], got {tuple(out.shape)}")
    return out


def _stack(parts: list, like: ArrayT) -> ArrayT:
    """Stacks four [...] coordinate arrays into [..., 4] of the same kind as ``like``."""
    if _is_tensor(like):
        return sys.modules["torch"].stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def xywh_to_xyxy(box: ArrayT) -> ArrayT:
    """Converts ``[x, y, w, h]`` (top-left corner and size) to ``[x0, y0, x1, y1]``."""
    box = _as_float(box)
    x, y, w, h = (box[..., i] for i in range(4))
    return _stack([x, y, x + w, y + h], box)


def xyxy_to_xywh(box: ArrayT) -> ArrayT:
    """Converts ``[x0, y0, x1, y1]`` to ``[x, y, w, h]``."""
    box = _as_float(box)
    x0, y0, x1, y1 = (box[..., i] for i in range(4))
    return _stack([x0, y0, x1 - x0, y1 - y0], box)


def xyxy_to_cxcywh(box: ArrayT) -> ArrayT:
    """Converts ``[x0, y0, x1, y1]`` to ``[cx, cy, w, h]``."""
    box = _as_float(box)
    x0, y0, x1, y1 = (box[..., i] for i in range(4))
    return _stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], box)


def cxcywh_to_xyxy(box: ArrayT) -> ArrayT:
    """Converts ``[cx, cy, w, h]`` to ``[x0, y0, x1, y1]``."""
    box = _as_float(box)
    cx, cy, w, h = (box[..., i] for i in range(4))
    return _stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], box)


def _affine(box: ArrayT, scale: tuple[float, float], offset: tuple[float, float]) -> ArrayT:
    """Applies ``x * sx + ox`` and ``y * sy + oy`` to xyxy boxes."""
    box = _as_float(box)
    s = [scale[0], scale[1], scale[0], scale[1]]
    o = [offset[0], offset[1], offset[0], offset[1]]
    if _is_tensor(box):
        return box * box.new_tensor(s) + box.new_tensor(o)
    return box * np.asarray(s, dtype=box.dtype) + np.asarray(o, dtype=box.dtype)


def _clip_xyxy(box: ArrayT, width: float, height: float) -> ArrayT:
    """Clips xyxy boxes to ``[0, width] x [0, height]``."""
    x0, y0, x1, y1 = (box[..., i] for i in range(4))
    if _is_tensor(box):
        parts = [x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)]
    else:
        parts = [np.clip(x0, 0, width), np.clip(y0, 0, height), np.clip(x1, 0, width), np.clip(y1, 0, height)]
    return _stack(parts, box)


# --------------------------------------------------------------------------------------------------
# Letterbox
# --------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: object) -> None:
    # NOTE: bool is a subclass of int; True as a size is always a bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


@dataclass(frozen=True)
class Letterbox:
    """The mapping from an ``orig_w x orig_h`` image onto a ``size x size`` canvas.

    The image is scaled by ``size / max(orig_w, orig_h)`` to ``new_w x new_h`` and pasted at
    ``(pad_x, pad_y)``. Build it with :meth:`fit`.

    Attributes:
        orig_w: Width of the original image in pixels.
        orig_h: Height of the original image in pixels.
        size: Side of the square canvas.
        new_w: Width of the resized image on the canvas.
        new_h: Height of the resized image on the canvas.
        pad_x: Left padding (columns before the image).
        pad_y: Top padding (rows before the image).
    """

    orig_w: int
    orig_h: int
    size: int
    new_w: int
    new_h: int
    pad_x: int
    pad_y: int

    def __post_init__(self) -> None:
        for name in ("orig_w", "orig_h", "size", "new_w", "new_h"):
            _check_positive_int(name, getattr(self, name))
        if self.new_w > self.size or self.new_h > self.size:
            raise ValueError(f"resized image {self.new_w}x{self.new_h} does not fit the {self.size} canvas")
        if not (0 <= self.pad_x <= self.size - self.new_w and 0 <= self.pad_y <= self.size - self.new_h):
            raise ValueError(f"padding ({self.pad_x}, {self.pad_y}) puts the image outside the canvas")

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> Letterbox:
        """Builds the letterbox that fits a ``width x height`` image into a ``size x size`` canvas.

        Args:
            width: Original image width in pixels.
            height: Original image height in pixels.
            size: Canvas side (448 for VG-LAW).

        Returns:
            The letterbox, with the resized image centred on the canvas.

        Raises:
            ValueError: If any argument is not a positive int.
        """
        _check_positive_int("width", width)
        _check_positive_int("height", height)
        _check_positive_int("size", size)
        scale = size / max(width, height)
        new_w = int(min(size, max(1, round(width * scale))))
        new_h = int(min(size, max(1, round(height * scale))))
        return cls(
            orig_w=int(width),
            orig_h=int(height),
            size=int(size),
            new_w=new_w,
            new_h=new_h,
            pad_x=(int(size) - new_w) // 2,
            pad_y=(int(size) - new_h) // 2,
        )

    @property
    def scale_x(self) -> float:
        """Horizontal scale from original to canvas pixels."""
        return self.new_w / self.orig_w

    @property
    def scale_y(self) -> float:
        """Vertical scale from original to canvas pixels."""
        return self.new_h / self.orig_h

    # ---- images -----------------------------------------------------------------------------------

    def image(self, img: Image.Image, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
        """Letterboxes a PIL image onto an RGB canvas.

        Any mode is converted to 8-bit RGB first by :func:`vglaw.images.to_rgb8`: high bit depths are scaled,
        not clipped, and images with transparency (RGBA, LA, PA, or P with a ``transparency`` entry) are
        alpha-composited over ``fill``, so transparent pixels look like the padding.

        Args:
            img: Image of size ``(orig_w, orig_h)``.
            fill: RGB colour of the padding.

        Returns:
            The ``size x size`` RGB canvas.
        """
        if img.size != (self.orig_w, self.orig_h):
            raise ValueError(f"image is {img.size[0]}x{img.size[1]}, letterbox expects {self.orig_w}x{self.orig_h}")
        rgb = to_rgb8(img, fill)
        resized = rgb.resize((self.new_w, self.new_h), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (self.size, self.size), tuple(fill))
        canvas.paste(resized, (self.pad_x, self.pad_y))
        return canvas

    # ---- boxes ------------------------------------------------------------------------------------

    def box_to_canvas(self, box_xyxy: ArrayT) -> ArrayT:
        """Maps xyxy boxes from original pixels to canvas pixels (numpy or torch, ``[..., 4]``)."""
        return _affine(box_xyxy, (self.scale_x, self.scale_y), (self.pad_x, self.pad_y))

    def box_from_canvas(self, box_xyxy: ArrayT) -> ArrayT:
        """Maps xyxy boxes from canvas pixels back to original pixels; the exact inverse of
        :meth:`box_to_canvas`. No clipping is applied."""
        sx, sy = 1.0 / self.scale_x, 1.0 / self.scale_y
        return _affine(box_xyxy, (sx, sy), (-self.pad_x * sx, -self.pad_y * sy))

    def box_to_normalized_cxcywh(self, box_xywh: ArrayT) -> ArrayT:
        """Turns a COCO ``[x, y, w, h]`` box in original pixels into the model's target.

        Returns:
            ``[cx, cy, w, h]`` in canvas pixels divided by ``size``, shape ``[..., 4]``.
        """
        canvas = self.box_to_canvas(xywh_to_xyxy(box_xywh))  # [..., 4] canvas xyxy
        return xyxy_to_cxcywh(canvas) / self.size

    def box_from_normalized_cxcywh(self, cxcywh: ArrayT) -> ArrayT:
        """Turns the model's normalised ``[cx, cy, w, h]`` into xyxy original pixels, clipped to the image."""
        canvas = cxcywh_to_xyxy(_as_float(cxcywh) * self.size)  # [..., 4] canvas xyxy
        return _clip_xyxy(self.box_from_canvas(canvas), self.orig_w, self.orig_h)

    # ---- masks ------------------------------------------------------------------------------------

    def mask_to_canvas(self, mask: np.ndarray, soft: bool = False) -> np.ndarray:
        """Letterboxes a binary mask.

        The mask is resized as float with bilinear interpolation (antialiased when shrinking). By default
        it is thresholded at 0.5; ``soft=True`` keeps the per-pixel coverage instead, which a canvas that
        has few pixels across an object needs for a faithful round trip through :meth:`mask_from_canvas`
        (and which is a valid target for the focal and Dice losses).

        Args:
            mask: ``[orig_h, orig_w]`` bool or {0, 1} integer mask.
            soft: return float32 coverage in [0, 1] rather than a binary mask.

        Returns:
            ``[size, size]`` uint8 mask with values in {0, 1} (float32 coverage if ``soft``); padding is 0.
        """
        mask = np.asarray(mask)
        if mask.shape != (self.orig_h, self.orig_w):
            raise ValueError(f"mask has shape {mask.shape}, expected {(self.orig_h, self.orig_w)}")
        canvas = np.zeros((self.size, self.size), dtype=np.float32 if soft else np.uint8)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return canvas
        # Only the output pixels the object can reach are computed, from only the source pixels their
        # kernels read: PIL's ``box`` keeps each output pixel's centre and kernel as in the full resize, so
        # the coverage is the same to float rounding (a pixel at exactly 0.5 may threshold either way), at
        # a fraction of the cost (COCO objects cover a small part of their image).
        x0, x1, cx0, cx1 = _reach(cols[0], cols[-1] + 1, self.scale_x, self.new_w, self.orig_w)
        y0, y1, cy0, cy1 = _reach(rows[0], rows[-1] + 1, self.scale_y, self.new_h, self.orig_h)
        # PIL's bilinear filter widens its support when shrinking (antialiasing), like F.interpolate with
        # antialias=True, and is ~30x faster than torch on the CPU for COCO-sized masks.
        src = Image.fromarray(np.ascontiguousarray(mask[cy0:cy1, cx0:cx1], dtype=np.float32), mode="F")
        box = (x0 / self.scale_x - cx0, y0 / self.scale_y - cy0, x1 / self.scale_x - cx0, y1 / self.scale_y - cy0)
        resized = np.asarray(src.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=box))
        region = np.clip(resized, 0, 1) if soft else (resized >= 0.5).astype(np.uint8)
        canvas[self.pad_y + y0 : self.pad_y + y1, self.pad_x + x0 : self.pad_x + x1] = region
        return canvas

    def mask_from_canvas(self, canvas: ArrayT) -> ArrayT:
        """Maps canvas mask probabilities back to the original resolution.

        Crops the region that holds the image, then resizes it bilinearly (``F.interpolate``, so a
        batched CUDA tensor stays on its device). Threshold the result yourself (VG-LAW uses 0.35).

        Args:
            canvas: Probabilities, numpy ``[size, size]`` or torch ``[..., size, size]``.

        Returns:
            Probabilities ``[..., orig_h, orig_w]`` of the input's kind (numpy results are float32).
        """
        if tuple(canvas.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"canvas has shape {tuple(canvas.shape)}, expected [..., {self.size}, {self.size}]")
        import torch

        is_numpy = isinstance(canvas, np.ndarray)
        t = torch.from_numpy(np.asarray(canvas, dtype=np.float32)) if is_numpy else canvas
        lead = t.shape[:-2]
        crop = t[..., self.pad_y : self.pad_y + self.new_h, self.pad_x : self.pad_x + self.new_w]
        x = crop.reshape(-1, 1, self.new_h, self.new_w)  # [N, 1, new_h, new_w]
        x = x if x.is_floating_point() else x.float()
        out = _resize(x, self.orig_h, self.orig_w).reshape(*lead, self.orig_h, self.orig_w)
        return out.numpy() if is_numpy else out


def _reach(first: int, stop: int, scale: float, out_len: int, in_len: int) -> tuple[int, int, int, int]:
    """Along one axis: the output pixels ``[o0, o1)`` that source pixels ``[first, stop)`` can affect under
    a bilinear resize by ``scale``, and the source pixels ``[i0, i1)`` those outputs' kernels read."""
    support = max(1.0, 1.0 / scale)  # in source pixels: the bilinear kernel widens when shrinking
    o0 = max(0, int(np.floor((first - support) * scale)) - 1)
    o1 = min(out_len, int(np.ceil((stop + support) * scale)) + 1)
    i0 = max(0, int(np.floor((o0 + 0.5) / scale - support)) - 1)
    i1 = min(in_len, int(np.ceil((o1 - 0.5) / scale + support)) + 1)
    return o0, o1, i0, i1


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of ``[N, C, h, w]`` with the pixel-centre convention, antialiased when shrinking."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == (height, width):
        return x.clone()
    shrinking = height < x.shape[-2] or width < x.shape[-1]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)


# --------------------------------------------------------------------------------------------------
# Horizontal flip
# --------------------------------------------------------------------------------------------------


def hflip_image(image: ImageT) -> ImageT:
    """Mirrors a PIL image or a tensor ``[..., H, W]`` left to right."""
    if isinstance(image, Image.Image):
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if _is_tensor(image):
        return image.flip(-1)
    raise TypeError(f"expected a PIL image or torch tensor, got {type(image).__name__}")


def hflip_box_xyxy(box: ArrayT, width: float) -> ArrayT:
    """Mirrors xyxy pixel boxes in an image ``width`` pixels wide: ``x -> width - x``."""
    box = _as_float(box)
    x0, y0, x1, y1 = (box[..., i] for i in range(4))
    return _stack([width - x1, y0, width - x0, y1], box)


def hflip_box_cxcywh_normalized(box: ArrayT) -> ArrayT:
    """Mirrors normalised ``[cx, cy, w, h]`` boxes: ``cx -> 1 - cx``."""
    box = _as_float(box)
    cx, cy, w, h = (box[..., i] for i in range(4))
    return _stack([1 - cx, cy, w, h], box)


def hflip_mask(mask: ArrayT) -> ArrayT:
    """Mirrors a mask (numpy or torch, ``[..., H, W]``) left to right."""
    if _is_tensor(mask):
        return mask.flip(-1)
    # NOTE: copy, so the result has positive strides and converts to torch without surprises.
    return np.ascontiguousarray(np.flip(np.asarray(mask), axis=-1))


# "left"/"right" as a whole word or as the stem of these words; hyphenated forms (left-most,
# left-handed, upper-left) are covered by the word boundary at the hyphen. Words that only contain the
# letters (bright, copyright, upright, alright, righteous, rightly) and "lefty"/"righty" are untouched.
_SPATIAL_SUFFIXES = (
    "most",
    "hand",
    "hands",
    "handed",
    "hander",
    "handers",
    "handside",
    "side",
    "sides",
    "sided",
    "ward",
    "wards",
    "ish",
)
_SPATIAL_WORD = re.compile(
    r"\b(left|right)(?=(?:" + "|".join(sorted(_SPATIAL_SUFFIXES, key=len, reverse=True)) + r")?\b)",
    flags=re.IGNORECASE,
)
_SWAP = {"left": "right", "right": "left"}


def _swap_stem(match: re.Match[str]) -> str:
    stem = match.group(1)
    other = _SWAP[stem.lower()]
    if stem.islower():
        return other
    if stem.isupper():
        return other.upper()
    if stem[0].isupper() and stem[1:].islower():
        return other.capitalize()
    # NOTE: odd casings ("lEfT") are left alone; mapping them would break swap(swap(x)) == x.
    return stem


def swap_spatial_words(text: str) -> str:
    """Swaps "left" and "right" (and words built on them) in an expression, preserving case.

    ``leftmost -> rightmost``, ``Left-hand -> Right-hand``, ``LEFT -> RIGHT``; ``bright``, ``copyright``,
    ``upright``, ``alright``, ``righteous`` and ``lefty`` are unchanged. The substitution is a single
    pass, so applying it twice returns the input exactly.

    Args:
        text: The referring expression.

    Returns:
        The expression as it reads for the mirrored image.
    """
    return _SPATIAL_WORD.sub(_swap_stem, text)


def hflip_sample(
    image: ImageT,
    box_cxcywh_normalized: ArrayT | None,
    mask: ArrayT | None,
    text: str,
) -> tuple[ImageT, ArrayT | None, ArrayT | None, str]:
    """Mirrors one letterboxed training sample: image, normalised box, mask and expression.

    Args:
        image: Canvas image (PIL or tensor ``[..., H, W]``).
        box_cxcywh_normalized: Target box ``[..., 4]`` normalised to the canvas, or None (RES-only).
        mask: Canvas mask ``[..., H, W]``, or None (REC-only).
        text: Referring expression.

    Returns:
        The flipped ``(image, box, mask, text)``; None entries stay None.
    """
    box = None if box_cxcywh_normalized is None else hflip_box_cxcywh_normalized(box_cxcywh_normalized)
    flipped_mask = None if mask is None else hflip_mask(mask)
    return hflip_image(image), box, flipped_mask, swap_spatial_words(text)
