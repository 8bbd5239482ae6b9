"""The MLflow pyfunc wrapper of VG-LAW, logged as code (MLflow "models from code").

This file is copied into every logged model and executed when the model loads, so it imports only ``vglaw``
(shipped beside it as a code path) and third-party packages, never ``pipelines``.

Input: a DataFrame with ``image`` (encoded image bytes, or the same base64-encoded as a string, optionally as
a ``data:`` URL) and ``expression``. Output: one row per input row with ``box`` ``[x0, y0, x1, y1]`` in the
image's pixels, ``box_normalized`` (divided by width / height), ``mask`` as COCO RLE
``{"size": [h, w], "counts": str}``, ``mask_area`` in pixels and ``truncated`` (the expression was cut).
"""

from __future__ import annotations

import base64
import binascii
import io
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import Array, ColSpec, DataType, Object, ParamSchema, ParamSpec, Property, Schema
from PIL import Image, ImageOps

import vglaw
from vglaw import Predictor
from vglaw.images import to_rgb8
from vglaw.rle import encode_mask

MODEL_DIR_ARTIFACT = "model_dir"
# Distributions the logged model needs besides mlflow itself; pinned to the versions it was logged with.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "tokenizers",
    "safetensors",
    "pycocotools",
    "numpy",
    "pillow",
    "pandas",
)


def vglaw_package_dir() -> Path:
    """The ``vglaw`` package folder, shipped with the model as a code path."""
    return Path(vglaw.__file__).resolve().parent


def pip_requirements() -> list[str]:
    """``name==version`` for :data:`REQUIREMENTS` (a local build tag such as ``+cu121`` is dropped)."""
    reqs = [f"mlflow=={metadata.version('mlflow')}"]
    for name in REQUIREMENTS:
        reqs.append(f"{name}=={metadata.version(name).split('+', 1)[0]}")
    return reqs


def model_signature() -> ModelSignature:
    """Input, output and params schema of :class:`VGLAWPyfunc`."""
    inputs = Schema([ColSpec(DataType.binary, "image"), ColSpec(DataType.string, "expression")])
    rle = Object([Property("size", Array(DataType.long)), Property("counts", DataType.string)])
    outputs = Schema(
        [
            ColSpec(Array(DataType.double), "box", required=False),
            ColSpec(Array(DataType.double), "box_normalized", required=False),
            ColSpec(rle, "mask", required=False),
            ColSpec(DataType.long, "mask_area", required=False),
            ColSpec(DataType.boolean, "truncated"),
        ]
    )
    params = ParamSchema([ParamSpec("return_mask", DataType.boolean, True)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def example_input() -> pd.DataFrame:
    """A one-row input: a small grey PNG and an expression."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()], "expression": ["the object on the left"]})


def decode_image_input(value: Any) -> Image.Image:
    """An 8-bit RGB image (:func:`vglaw.images.to_rgb8`), upright by its EXIF orientation, from encoded bytes or
    from a base64 string (a ``data:...;base64,`` prefix is allowed)."""
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = base64.b64decode(text, validate=True)
        except binascii.Error as err:
            raise ValueError("image string is not valid base64") from err
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"image must be bytes or a base64 string, got {type(value).__name__}")
    # NOTE: no ``with``: to_rgb8 returns an RGB image itself, and closing it would free its pixels. Decoding from
    # memory leaves no file open.
    img = Image.open(io.BytesIO(bytes(value)))
    img.load()
    # EXIF orientation applied, as the Serve endpoint does: a phone photo is grounded the way it is shown.
    return to_rgb8(ImageOps.exif_transpose(img))


class VGLAWPyfunc(PythonModel):
    """Image + expression -> box + mask, through :class:`vglaw.Predictor`."""

    def load_context(self, context: PythonModelContext) -> None:
        """Builds the predictor from the logged model directory (on CUDA when available)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.from_pretrained(context.artifacts[MODEL_DIR_ARTIFACT], device=device)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Grounds each row's expression in its image; see the module docstring for the columns."""
        return_mask = bool((params or {}).get("return_mask", True))
        frame = pd.DataFrame(model_input)
        missing = {"image", "expression"} - set(frame.columns)
        if missing:
            raise ValueError(f"input lacks the columns {sorted(missing)}")
        images = [decode_image_input(v) for v in frame["image"]]
        expressions = [str(e) for e in frame["expression"]]
        results = self.predictor.predict(images, expressions, return_mask=return_mask) if len(frame) else []
        rows = []
        for r in results:
            rows.append(
                {
                    "box": None if r.box is None else [float(v) for v in r.box],
                    "box_normalized": None if r.box_normalized is None else [float(v) for v in r.box_normalized],
                    "mask": None if r.mask is None else encode_mask(r.mask, text=True),
                    "mask_area": None if r.mask is None else int(r.mask.sum()),
                    "truncated": bool(r.truncated),
                }
            )
        return pd.DataFrame(rows, columns=["box", "box_normalized", "mask", "mask_area", "truncated"])


mlflow.models.set_model(VGLAWPyfunc())
