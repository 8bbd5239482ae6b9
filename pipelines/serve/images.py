"""Opening the images clients upload: untrusted bytes checked for size and pixel count before decoding."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.serve.errors import ApiError
from pipelines.serve.requests import RequestLimits
from vglaw.images import to_rgb8

__all__ = ["ALLOWED_IMAGE_FORMATS", "open_image"]

# Formats PIL may open: the common web ones. Leaving out the rest (TIFF, PSD, EPS, ...) keeps PIL's rarer
# and historically less robust decoders away from untrusted bytes.
ALLOWED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


def open_image(data: bytes, limits: RequestLimits) -> Image.Image:
    """Decodes untrusted image bytes, checking size and pixel count before the pixels are decompressed.

    The returned image is fully loaded, in its displayed orientation (EXIF orientation applied), and in
    8-bit RGB by :func:`vglaw.images.to_rgb8`, the conversion the Predictor uses (16-bit samples scaled, not
    clipped; transparency composited over black, the letterbox's padding).

    Raises:
        ApiError: 400 for empty, unreadable or truncated data, 413 over the byte or pixel limits.
    """
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)", field="image")
    if len(data) > limits.max_image_bytes:
        raise ApiError(
            413,
            "image_too_large",
            f"the image has {len(data)} bytes; the limit is {limits.max_image_bytes}",
            field="image",
        )
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; our own limit is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
        except Image.DecompressionBombError as err:
            message = f"the image header declares too many pixels ({err})"
            raise ApiError(413, "too_many_pixels", message, field="image") from None
        except UnidentifiedImageError:
            raise ApiError(
                400,
                "invalid_image",
                f"the data is not an image in a supported format ({', '.join(ALLOWED_IMAGE_FORMATS)})",
                field="image",
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _unreadable(err, "the image header cannot be read") from None
        # Image.open reads only the header: the pixel check happens before any decompression.
        width, height = image.size
        if width < 1 or height < 1:
            raise ApiError(400, "invalid_image", f"the image is {width}x{height}", field="image")
        if width * height > limits.max_image_pixels:
            raise ApiError(
                413,
                "too_many_pixels",
                f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels} "
                "(checked from the header, before decoding)",
                field="image",
            )
        try:
            image.load()
            return to_rgb8(ImageOps.exif_transpose(image))
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _unreadable(err, "the image cannot be decoded") from None


def _unreadable(err: Exception, what: str) -> ApiError:
    """A 400 for a decoder error: ``truncated_image`` when the data ends early, else ``invalid_image``."""
    text = str(err) or type(err).__name__
    truncated = "truncated" in text.lower() or isinstance(err, EOFError)
    return ApiError(400, "truncated_image" if truncated else "invalid_image", f"{what}: {text}", field="image")
