"""Any image -> 8-bit RGB: the one pixel conversion that the Predictor, Serve, the MLflow pyfunc and preprocessing
share (through :func:`to_rgb8`, which :meth:`vglaw.geometry.Letterbox.image` also calls).

PIL's ``convert("RGB")`` clips 16-bit, 32-bit and float samples at 255, so a 16-bit greyscale PNG becomes a white
image. Here every PIL mode (and numpy arrays) maps to 8 bits by a stated rule:

================================  ==================================================================================
Mode                              Rule
================================  ==================================================================================
``RGB``                           returned as it is (the same object)
``L``                             grey copied to R, G and B
``1``                             0 -> 0, 1 -> 255
``I;16``, ``I;16B``/``L``/``N``   ``v >> 8`` (the high byte; exact). Pillow reduces 16-bit RGB, RGBA and grey+alpha
                                  PNGs the same way while decoding (they open as ``RGB`` / ``RGBA``), so one 16-bit
                                  picture gives the same 8 bits whichever colour type it was saved as; and an 8-bit
                                  value stored as ``v * 257`` comes back exactly.
``I`` (int32)                     16-bit samples (``v >> 8``) when every value is in [0, 65535]: Pillow opens 16-bit
                                  PGMs as ``I`` (scaled to 0..65535 whatever their maxval), and older Pillows did
                                  so with 16-bit PNGs. Otherwise (32-bit TIFFs, arrays) the data have no fixed
                                  range and are stretched: ``(v - min) * 255 / (max - min)``, rounded
                                  half up (a constant image gives 0). NOTE: an ``I`` image holding 8-bit values
                                  (0..255) is therefore read as dark 16-bit data; the rule depends on the values
                                  only through "fits 16 bits?", never on how bright the picture is.
``F`` (float)                     ``v * 255`` when every finite value is in [0, 1] (the float-image convention);
                                  else ``v`` when in [0, 255] (what ``convert("F")`` of an 8-bit image holds);
                                  else stretched over [min, max] as for ``I``. Rounded half up; NaN -> 0,
                                  +inf -> 255, -inf -> 0.
``RGBA``, ``LA``, ``PA``,         alpha-composited over ``fill`` (the letterbox padding colour, black by default),
``RGBa``, ``La``, ``P`` with      as the letterbox always did: ``round_half_up((c * a + fill * (255 - a)) / 255)``,
``transparency``                  exact. Transparent pixels thus look like the padding. Only alpha channels and
                                  palette transparency count: a ``tRNS`` colour key of an ``L`` / ``RGB`` /
                                  ``I;16`` PNG is ignored, as before.
``P``                             palette lookup
``CMYK``                          ``round_half_up((255 - C) * (255 - K) / 255)`` per channel (PIL's conversion,
                                  without ICC profiles; exact)
``YCbCr``                         JFIF full-range BT.601 (PIL's fixed-point conversion, within 1 of the float
                                  formula)
others (``HSV``, ``LAB``, ...)    PIL's ``convert("RGB")``; a mode PIL cannot convert is a ``ValueError``
================================  ==================================================================================

Numpy arrays: ``[H, W]`` (or ``[H, W, 1]``) of uint8 is ``L``, bool is ``1``, uint16 is ``I;16``, any other
integer type follows the ``I`` rule and floats the ``F`` rule; ``[H, W, 2 | 3 | 4]`` uint8 is ``LA`` / ``RGB`` /
``RGBA``, and uint16 is reduced with ``v >> 8`` first, as Pillow does with 16-bit colour PNGs.

EXIF orientation is not handled here: it belongs to opening a file (Serve's ingress applies it).
This module imports neither torch nor anything of the pipeline, so that data workers can use it alone.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["ALPHA_MODES", "HIGH_DEPTH_MODES", "grey_to_uint8", "to_rgb8"]

# Modes whose samples exceed 8 bits; PIL's convert() clips them at 255, so they are scaled here instead.
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
# Modes with an alpha channel (premultiplied ones included); P counts when it has a ``transparency`` entry.
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_CHANNEL_MODES = {2: "LA", 3: "RGB", 4: "RGBA"}


def to_rgb8(image: Image.Image | np.ndarray, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Converts an image of any mode to 8-bit RGB by the rules in this module's docstring.

    Args:
        image: A PIL image of any mode, or a numpy array (see the module docstring for the shapes and dtypes).
        fill: RGB colour that transparent pixels are composited over.

    Returns:
        An ``RGB`` image of the same size; ``image`` itself when it is already an ``RGB`` PIL image.

    Raises:
        ValueError: For an array of unsupported shape or dtype, or a mode PIL cannot convert to RGB.
    """
    if isinstance(image, np.ndarray):
        image = _image_from_array(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in HIGH_DEPTH_MODES:
        return Image.fromarray(grey_to_uint8(np.asarray(image))).convert("RGB")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        # NOTE: via LA for La, which PIL cannot take to RGBA directly.
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*fill, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert a mode {mode} image to RGB: {err}") from err


def grey_to_uint8(samples: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` from greyscale samples of any depth: uint8 as is, bool as 0/255, uint16 ``v >> 8``, other
    integers by the ``I`` rule and floats by the ``F`` rule of the module docstring."""
    a = np.asarray(samples)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype.kind in "iu":
        if (a.dtype.kind == "u" and a.dtype.itemsize == 2) or a.size == 0 or (a.min() >= 0 and a.max() <= 65535):
            return (a >> 8).astype(np.uint8)  # 16-bit samples: the high byte
        return _stretch(a.astype(np.float64), float(a.min()), float(a.max()))
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
        work = np.where(finite, a, lo)  # [H, W]; non-finite values are set after scaling
        if lo >= 0.0 and hi <= 1.0:
            out = _round_to_uint8(work * 255.0)
        elif lo >= 0.0 and hi <= 255.0:
            out = _round_to_uint8(work)
        else:
            out = _stretch(work, lo, hi)
        out[np.isnan(a)] = 0
        out[np.isposinf(a)] = 255
        out[np.isneginf(a)] = 0
        return out
    raise ValueError(f"cannot read {a.dtype} samples as a greyscale image")


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Maps [lo, hi] linearly onto [0, 255], rounded half up; everything 0 when lo == hi."""
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return _round_to_uint8((a - lo) * (255.0 / (hi - lo)))


def _round_to_uint8(x: np.ndarray) -> np.ndarray:
    """Rounds half up and clips to [0, 255]."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _image_from_array(array: np.ndarray) -> Image.Image:
    """A PIL image for a greyscale ``[H, W]`` / ``[H, W, 1]`` array or an ``[H, W, 2 | 3 | 4]`` uint8/uint16 one."""
    a = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    if a.ndim == 2:
        if a.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(a))
        return Image.fromarray(grey_to_uint8(a))
    if a.ndim == 3 and a.shape[2] in _CHANNEL_MODES and a.dtype in (np.uint8, np.uint16):
        if a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)  # as Pillow decodes 16-bit colour PNGs
        return Image.fromarray(np.ascontiguousarray(a))
    raise ValueError(
        f"expected a greyscale [H, W] array or an [H, W, 3] (LA: 2, RGBA: 4) uint8 or uint16 array, "
        f"got {a.dtype} {array.shape}"
    )
