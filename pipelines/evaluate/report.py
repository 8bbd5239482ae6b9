"""Evaluation reports: the JSON document, the accuracy-by-length plot, and prediction overlay grids.

:func:`overlay_examples` is what the training stage logs every epoch (``mlflow.log_image(grid, artifact_file=
"overlays/epoch_003.png")``); :func:`overlay_grid` draws any images with boxes and masks.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from pipelines.data.manifest import code_version, read_manifest
from pipelines.data.parquet import decode_image, letterbox_of
from vglaw import Predictor
from vglaw.geometry import xywh_to_xyxy
from vglaw.images import to_rgb8
from vglaw.metrics import GroundingMetrics, box_iou_paired
from vglaw.rle import decode_rle

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipelines.evaluate.inference import SplitEvaluation

__all__ = [
    "REPORT_VERSION",
    "build_report",
    "data_identity",
    "length_breakdown",
    "overlay_examples",
    "overlay_grid",
    "plot_length_breakdown",
    "wrap_caption",
    "write_report",
]

REPORT_VERSION = 1
PRED_COLOUR = (230, 40, 40)
TRUE_COLOUR = (40, 200, 60)


# --------------------------------------------------------------------------------------------------
# JSON report
# --------------------------------------------------------------------------------------------------


def data_identity(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parts of a preprocessed dataset's manifest that say what was evaluated."""
    manifest = read_manifest(data_dir)
    keys = ("dataset", "split_by", "image_size", "image_format", "schema_version", "created_at", "source_files")
    info = {k: manifest.get(k) for k in keys}
    info["dir"] = str(Path(data_dir).absolute())
    info["split_rows"] = {name: s.get("rows") for name, s in manifest.get("splits", {}).items()}
    info["code_version"] = manifest.get("code_version")
    return info


def length_breakdown(metrics: GroundingMetrics) -> dict[str, dict[str, float]]:
    """``{bucket: {"count": n, "prec@0.5": ..., "miou": ...}}`` from an accumulator, in bucket order."""
    computed = metrics.compute()
    out = {}
    for name in metrics.bucket_names:
        suffix = f"/len_{name}"
        out[name] = {k[: -len(suffix)]: v for k, v in computed.items() if k.endswith(suffix)}
    return out


def split_section(evaluation: SplitEvaluation) -> dict[str, Any]:
    """The report entry of one split."""
    computed = evaluation.metrics.compute()
    overall = {k: v for k, v in computed.items() if "/len_" not in k}
    return {
        "count": evaluation.count,
        "metrics": overall,
        "by_length": length_breakdown(evaluation.metrics),
        "truncated_expressions": int(np.asarray(evaluation.results["truncated"]).sum()),
        # NOTE: actor time on this split's rows; model loading and Ray start-up are in the report's timing.
        "actor_seconds": round(evaluation.seconds, 3),
        "rows_per_actor_s": round(evaluation.count / evaluation.seconds, 2) if evaluation.seconds > 0 else None,
        "metric_state": evaluation.metrics.state_dict(),
    }


def build_report(
    evaluations: Sequence[SplitEvaluation],
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
    timing: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON-serialisable evaluation report.

    Args:
        evaluations: One per split, from :func:`pipelines.evaluate.inference.evaluate_split`.
        model: :func:`pipelines.tracking.registry.model_identity`'s output, as a dict.
        data: :func:`data_identity`'s output.
        settings: Run settings (actors, batch size, ...); defaults to the first evaluation's.
        timing: Extra timings in seconds (e.g. ``{"total_s": ...}``).
    """
    return {
        "report_version": REPORT_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": dict(model),
        "data": dict(data),
        "settings": dict(settings if settings is not None else (evaluations[0].settings if evaluations else {})),
        "splits": {e.split: split_section(e) for e in evaluations},
        "timing": {"actor_inference_s": round(sum(e.seconds for e in evaluations), 3), **dict(timing or {})},
        "code_version": code_version(),
    }


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Writes the report as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot_length_breakdown(report: Mapping[str, Any], keys: Sequence[str] = ("prec@0.5", "miou")) -> Figure:
    """Grouped bars of each metric by expression length, one bar per split (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    splits = report["splits"]
    shown = [k for k in keys if any(k in s["metrics"] for s in splits.values())] or list(keys[:1])
    fig = Figure(figsize=(5.0 * len(shown), 3.6), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, key in zip(axes, shown):
        width = 0.8 / max(1, len(splits))
        for i, (name, split) in enumerate(splits.items()):
            buckets = list(split["by_length"])
            values = [100 * split["by_length"][b].get(key, float("nan")) for b in buckets]
            xs = np.arange(len(buckets)) + (i - (len(splits) - 1) / 2) * width
            ax.bar(xs, values, width, label=f"{name} ({split['count']})")
            ax.set_xticks(np.arange(len(buckets)), [f"{b} words" for b in buckets])
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{key} (%)")
        ax.set_title(f"{key} by expression length")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # NOTE: Pillow without FreeType has only the fixed bitmap font.
        return ImageFont.load_default()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (in the mask, with a 4-neighbour outside it)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def wrap_caption(text: str, fits: Callable[[str], bool], max_lines: int = 3) -> list[str]:
    """``text`` broken at spaces into at most ``max_lines`` lines for which ``fits`` holds (down to one character).

    A word too long for a line of its own is cut; text beyond the last line is dropped, and that line ends with
    "~" to say so.
    """
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and fits(f"{line} {words[0]}"):
            line = f"{line} {words.pop(0)}"
        if words and len(lines) == max_lines - 1:
            line = line.rstrip() + "~"
        while len(line) > 1 and not fits(line):
            line = line[:-2].rstrip() + "~"
        lines.append(line)
    return lines


def overlay_grid(
    images: Sequence[np.ndarray | Image.Image],
    pred_boxes: Sequence[Sequence[float] | None] | None = None,
    true_boxes: Sequence[Sequence[float] | None] | None = None,
    pred_masks: Sequence[np.ndarray | None] | None = None,
    true_masks: Sequence[np.ndarray | None] | None = None,
    captions: Sequence[str] | None = None,
    columns: int = 4,
    tile_size: int = 256,
    caption_lines: int = 3,
) -> Image.Image:
    """Draws predictions over images and tiles them into one RGB image.

    Predicted masks are tinted red, true masks outlined green; predicted boxes are red, true boxes green.
    Boxes are ``[x0, y0, x1, y1]`` and masks ``[H, W]`` in each image's own pixels.

    Args:
        images: RGB images (``[H, W, 3]`` uint8 arrays or PIL).
        pred_boxes: Predicted boxes, per image (None entries are skipped, as are all when omitted).
        true_boxes: Ground-truth boxes.
        pred_masks: Predicted boolean masks.
        true_masks: Ground-truth masks.
        captions: Text under each tile (e.g. the expression and the IoU), wrapped to the tile's width in up to
            ``caption_lines`` lines.
        columns: Tiles per row.
        tile_size: Side of each tile; images are scaled to fit, keeping their aspect ratio.
        caption_lines: The most lines a caption takes.
    """
    if columns < 1 or tile_size < 16 or caption_lines < 1:
        raise ValueError(
            f"columns, tile_size and caption_lines must be >= 1, 16 and 1, got {columns}, {tile_size}, {caption_lines}"
        )
    n = len(images)
    font = _font(max(10, tile_size // 18))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [
        wrap_caption(str(text), lambda line: measure.textlength(line, font=font) <= tile_size - 8, caption_lines)
        for text in captions or ()
    ]
    line_h = max(14, tile_size // 16) + 2
    caption_h = 0 if captions is None else max([1, *(len(lines) for lines in wrapped)]) * line_h + 4
    rows = max(1, -(-n // columns))
    grid = Image.new("RGB", (min(n, columns) * tile_size or tile_size, rows * (tile_size + caption_h)), (24, 24, 24))

    def pick(seq: Sequence[Any] | None, i: int) -> Any:
        return None if seq is None else seq[i]

    for i, image in enumerate(images):
        rgb = np.asarray(to_rgb8(image) if isinstance(image, Image.Image) else image, dtype=np.uint8)
        h, w = rgb.shape[:2]
        scale = tile_size / max(h, w)
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = rgb.astype(np.float32)
        pred_mask, true_mask = pick(pred_masks, i), pick(true_masks, i)
        if pred_mask is not None:
            sel = np.asarray(pred_mask, bool)
            canvas[sel] = 0.55 * canvas[sel] + 0.45 * np.asarray(PRED_COLOUR, np.float32)
        tile = Image.fromarray(canvas.astype(np.uint8)).resize((tw, th), Image.Resampling.BILINEAR)
        if true_mask is not None:
            small = Image.fromarray(np.asarray(true_mask, np.uint8) * 255).resize((tw, th), Image.Resampling.NEAREST)
            edge = _outline(np.asarray(small) > 127)
            pixels = np.asarray(tile).copy()
            pixels[edge] = TRUE_COLOUR
            tile = Image.fromarray(pixels)
        draw = ImageDraw.Draw(tile)
        for box, colour in ((pick(true_boxes, i), TRUE_COLOUR), (pick(pred_boxes, i), PRED_COLOUR)):
            if box is not None and np.all(np.isfinite(box)):
                x0, y0, x1, y1 = (float(v) * scale for v in box)
                draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=max(1, tile_size // 128))
        col, row = i % columns, i // columns
        left, top = col * tile_size + (tile_size - tw) // 2, row * (tile_size + caption_h) + (tile_size - th) // 2
        grid.paste(tile, (left, top))
        if captions is not None:
            writer = ImageDraw.Draw(grid)
            for k, line in enumerate(wrapped[i]):
                origin = (col * tile_size + 4, row * (tile_size + caption_h) + tile_size + 2 + k * line_h)
                writer.text(origin, line, fill=(235, 235, 235), font=font)
    return grid


def overlay_examples(
    predictor: Predictor,
    batch: Mapping[str, Any] | pa.Table | Sequence[Mapping[str, Any]],
    max_items: int = 8,
    columns: int = 4,
) -> Image.Image:
    """Predicts the first ``max_items`` rows of a batch and draws them with their ground truth.

    The original image is approximated from the stored letterboxed canvas (the region it occupies, resized
    back to the original size), so boxes and masks are drawn in original pixels, as they are scored.

    Args:
        predictor: The model to show.
        batch: Rows of the row schema, in any form :func:`pipelines.evaluate.scoring.evaluate_rows` takes (columns,
            a table, or row dicts).
        max_items: Rows to draw.
        columns: Tiles per row.
    """
    from pipelines.evaluate.scoring import columns_of

    data = columns_of(batch)
    n = min(max_items, len(data["expression"]))
    rows = [{k: v[i] for k, v in data.items()} for i in range(n)]
    boxes = [xywh_to_xyxy(np.asarray(r["box_xywh"], np.float64).reshape(4)) for r in rows]
    fits = [letterbox_of(r) for r in rows]
    canvases = [decode_image(r["image"]) for r in rows]
    images = [
        np.asarray(
            Image.fromarray(c)
            .crop((f.pad_x, f.pad_y, f.pad_x + f.new_w, f.pad_y + f.new_h))
            .resize((f.orig_w, f.orig_h), Image.Resampling.BILINEAR)
        )
        for c, f in zip(canvases, fits)
    ]
    import torch

    stacked = torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2) if n else torch.zeros(0, 3, 1, 1)
    results = predictor.predict_letterboxed(stacked, fits, [str(r["expression"]) for r in rows]) if n else []
    captions = []
    for r, g, truth in zip(rows, results, boxes):
        iou = "" if g.box is None else f"IoU {float(box_iou_paired(np.asarray(g.box), truth)):.2f} | "
        captions.append(f"{iou}{r['expression']}")
    return overlay_grid(
        images,
        pred_boxes=[g.box for g in results],
        true_boxes=boxes,
        pred_masks=[g.mask for g in results],
        true_masks=[decode_rle(r["mask_rle"], [int(v) for v in r["mask_size"]]) for r in rows],
        captions=captions,
        columns=columns,
    )
