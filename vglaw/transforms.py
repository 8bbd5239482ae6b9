"""Image tensors for the model: uint8 letterboxed canvases -> normalised float tensors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vglaw.images import to_rgb8

# ImageNet statistics, as ViTDet / SAM / MAE backbones were trained with.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


def to_uint8_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """An image (PIL of any mode, see :func:`vglaw.images.to_rgb8`, or an [H, W, 3] uint8 array) -> [3, H, W] uint8."""
    array = np.asarray(to_rgb8(image) if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {array.dtype} {array.shape}")
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch.from_numpy needs writable memory (PIL hands out read-only views)
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1)


def normalize(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [B, 3, H, W] (or [3, H, W]) -> normalised ``dtype``; run it on the device to ship bytes, not floats."""
    mean = torch.tensor(PIXEL_MEAN, device=images.device, dtype=dtype).view(-1, 1, 1) * 255
    std = torch.tensor(PIXEL_STD, device=images.device, dtype=dtype).view(-1, 1, 1) * 255
    return (images.to(dtype) - mean) / std
