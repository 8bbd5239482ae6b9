"""Image + expression -> box + mask: the one inference path shared by training, evaluation, serving and the CLI."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vglaw.geometry import Letterbox, cxcywh_to_xyxy
from vglaw.images import to_rgb8
from vglaw.model import VGLAW
from vglaw.precision import Precision, autocast, resolve_precision
from vglaw.tokenizer import ExpressionTokenizer
from vglaw.transforms import normalize, to_uint8_tensor

ImageLike = Image.Image | np.ndarray


@dataclass
class Grounding:
    """One expression's answer, in the original image's pixels."""

    box: tuple[float, float, float, float] | None  # [x0, y0, x1, y1]
    box_normalized: tuple[float, float, float, float] | None  # the same divided by width / height
    mask: np.ndarray | None  # bool [H, W]
    mask_probs: np.ndarray | None  # float32 [H, W]
    truncated: bool  # the expression was longer than the model's token limit and was cut


@dataclass
class CanvasPrediction:
    """Raw predictions on letterboxed canvases, before mapping back to the original images."""

    boxes: Tensor | None  # [B, 4] normalised (cx, cy, w, h) on the canvas
    mask_probs: Tensor | None  # [B, S, S]
    truncated: list[bool]


class Predictor:
    """Runs a VG-LAW model on images and expressions.

    Args:
        model: the model; put into eval mode here.
        tokenizer: the tokenizer it was trained with.
        device: where to run; defaults to the model's device.
        mask_threshold: probability at which a pixel is in the mask; defaults to the model config's (0.35).
        batch_size: expressions per forward pass.
        precision: ``"fp32"`` or ``"bf16"`` (autocast; parameters stay fp32); None takes the device's default,
            bf16 on CUDA and fp32 elsewhere (see :func:`vglaw.precision.resolve_precision`).
    """

    def __init__(
        self,
        model: VGLAW,
        tokenizer: ExpressionTokenizer,
        device: torch.device | str | None = None,
        mask_threshold: float | None = None,
        batch_size: int = 16,
        precision: str | None = None,
    ) -> None:
        if tokenizer.vocab_size != model.config.text.vocab_size:
            raise ValueError(
                f"tokenizer ({tokenizer.vocab_size}) and model ({model.config.text.vocab_size}) vocabs differ"
            )
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_size = model.config.vision.image_size
        self.mask_threshold = model.config.head.mask_threshold if mask_threshold is None else mask_threshold
        self.batch_size = batch_size
        self.precision: Precision = resolve_precision(precision, self.device)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: torch.device | str = "cpu", precision: str | None = None
    ) -> Predictor:
        """A predictor for a model directory written by :func:`vglaw.checkpoint.save_pretrained`."""
        from vglaw.checkpoint import load_pretrained

        model, tokenizer = load_pretrained(directory, device=device)
        return cls(model, tokenizer, device=device, precision=precision)

    @torch.inference_mode()
    def predict_canvas(self, canvases: Tensor, expressions: Sequence[str]) -> CanvasPrediction:
        """Predict on letterboxed uint8 canvases [B, 3, S, S], one expression each."""
        if canvases.ndim != 4 or canvases.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected canvases [B, 3, {self.image_size}, {self.image_size}], got {tuple(canvases.shape)}"
            )
        if len(expressions) != canvases.shape[0]:
            raise ValueError(f"{canvases.shape[0]} images but {len(expressions)} expressions")
        for text in expressions:
            if not isinstance(text, str) or not text.strip():
                raise ValueError("every expression must be a non-empty string")
        boxes, probs, truncated = [], [], []
        for start in range(0, len(expressions), self.batch_size):
            chunk = expressions[start : start + self.batch_size]
            tokens = self.tokenizer(chunk).to(self.device)
            images = normalize(canvases[start : start + self.batch_size].to(self.device))
            with autocast(self.precision, self.device):
                out = self.model(images, tokens.input_ids, tokens.attention_mask)
            if out.boxes is not None:
                boxes.append(out.boxes.float())
            if out.mask_logits is not None:
                probs.append(out.mask_logits.float().sigmoid())
            truncated.extend(tokens.truncated)
        return CanvasPrediction(
            boxes=torch.cat(boxes) if boxes else None,
            mask_probs=torch.cat(probs) if probs else None,
            truncated=truncated,
        )

    def predict_letterboxed(
        self,
        canvases: Tensor,
        letterboxes: Sequence[Letterbox],
        expressions: Sequence[str],
        return_mask: bool = True,
        threshold: float | None = None,
    ) -> list[Grounding]:
        """Predict on canvases already letterboxed with ``letterboxes`` and map back to the original images."""
        raw = self.predict_canvas(canvases, expressions)
        threshold = self.mask_threshold if threshold is None else threshold
        results = []
        for i, box_fit in enumerate(letterboxes):
            box = box_norm = mask = probs = None
            if raw.boxes is not None:
                canvas_xyxy = cxcywh_to_xyxy(raw.boxes[i].cpu().numpy().astype(np.float64)) * self.image_size
                xyxy = np.asarray(box_fit.box_from_canvas(canvas_xyxy), dtype=np.float64)
                xyxy = np.clip(xyxy, 0, [box_fit.orig_w, box_fit.orig_h] * 2)
                box = tuple(float(v) for v in xyxy)
                box_norm = tuple(float(v) for v in xyxy / ([box_fit.orig_w, box_fit.orig_h] * 2))
            if raw.mask_probs is not None and return_mask:
                probs = _to_numpy(box_fit.mask_from_canvas(raw.mask_probs[i])).astype(np.float32)
                mask = probs >= threshold
            results.append(Grounding(box, box_norm, mask, probs, raw.truncated[i]))
        return results

    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        expressions: str | Sequence[str],
        return_mask: bool = True,
        threshold: float | None = None,
    ) -> Grounding | list[Grounding]:
        """Ground expressions in images (PIL images of any mode, or arrays: RGB uint8 [H, W, 3] and the others
        :func:`vglaw.images.to_rgb8` reads, e.g. 16-bit greyscale [H, W]).

        One image with one expression gives one :class:`Grounding`; lists give a list. One image with several
        expressions grounds each of them in that image.
        """
        single = isinstance(expressions, str)
        texts = [expressions] if single else list(expressions)
        pictures = [images] if isinstance(images, (Image.Image, np.ndarray)) else list(images)
        if len(pictures) == 1 and len(texts) > 1:
            pictures = pictures * len(texts)
        if len(pictures) != len(texts):
            raise ValueError(f"{len(pictures)} images but {len(texts)} expressions")
        canvases, fits = [], []
        for picture in pictures:
            # NOTE: to 8 bits here, not by PIL's convert("RGB"), which clips 16-bit and float samples at 255.
            picture = to_rgb8(picture if isinstance(picture, Image.Image) else np.asarray(picture))
            fit = Letterbox.fit(picture.width, picture.height, self.image_size)
            canvases.append(to_uint8_tensor(fit.image(picture)))
            fits.append(fit)
        results = self.predict_letterboxed(torch.stack(canvases), fits, texts, return_mask, threshold)
        return results[0] if single else results


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
