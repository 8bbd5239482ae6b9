"""Evaluation metrics for visual grounding: Prec@0.5 and mean box IoU (REC), mIoU and oIoU (RES).

* Prec@0.5: fraction of expressions whose predicted box has IoU >= 0.5 with the ground truth.
* mIoU: mean over expressions of the mask IoU; oIoU: total intersection / total union over the split.

:class:`GroundingMetrics` accumulates these per expression-length bucket, and its state is a plain,
JSON-serialisable dict that can be merged across workers (sharded evaluation) exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["GroundingMetrics", "box_iou_paired", "mask_intersection_union", "mask_iou", "word_count"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# IoU sums are kept as integers in units of 2**-IOU_FIXED_BITS (see GroundingMetrics).
IOU_FIXED_BITS = 48
_STATE_VERSION = 1


def word_count(expression: str) -> int:
    """Number of whitespace-separated words in an expression (attached punctuation counts with its word)."""
    return len(expression.split())


def box_iou_paired(a_xyxy: ArrayT, b_xyxy: ArrayT) -> ArrayT:
    """IoU of corresponding boxes (not all pairs).

    Args:
        a_xyxy: Boxes ``[..., 4]`` as (x0, y0, x1, y1), numpy or torch.
        b_xyxy: Boxes of the same shape and kind.

    Returns:
        IoU ``[...]``; 0 where the union is empty (two degenerate boxes), never NaN. Computed in float64; a
        torch result has the inputs' dtype but at least float32 (bf16 or fp16 boxes give float32 IoUs).
    """
    if a_xyxy.shape != b_xyxy.shape or a_xyxy.shape[-1] != 4:
        raise ValueError(f"expected two [..., 4] arrays of one shape, got {a_xyxy.shape} and {b_xyxy.shape}")
    if isinstance(a_xyxy, torch.Tensor):
        a, b = a_xyxy.double(), b_xyxy.double().to(a_xyxy.device)
        lo, hi, clip, where = torch.maximum, torch.minimum, lambda x: x.clamp(min=0), torch.where
    else:
        a, b = np.asarray(a_xyxy, np.float64), np.asarray(b_xyxy, np.float64)
        lo, hi, clip, where = np.maximum, np.minimum, lambda x: np.clip(x, 0, None), np.where
    area_a = clip(a[..., 2] - a[..., 0]) * clip(a[..., 3] - a[..., 1])  # [...]
    area_b = clip(b[..., 2] - b[..., 0]) * clip(b[..., 3] - b[..., 1])  # [...]
    iw = clip(hi(a[..., 2], b[..., 2]) - lo(a[..., 0], b[..., 0]))
    ih = clip(hi(a[..., 3], b[..., 3]) - lo(a[..., 1], b[..., 1]))
    inter = iw * ih
    union = area_a + area_b - inter
    safe = where(union > 0, union, 1.0 + 0 * union)
    iou = where(union > 0, inter / safe, 0 * union)
    if isinstance(a_xyxy, torch.Tensor) and a_xyxy.is_floating_point():
        # NOTE: never narrower than float32: a bf16 IoU is only good to 2**-9, enough to flip IoU >= 0.5.
        return iou.to(torch.promote_types(a_xyxy.dtype, torch.float32))
    return iou


def mask_intersection_union(pred: ArrayT, gt: ArrayT) -> tuple[ArrayT, ArrayT]:
    """Pixel counts of intersection and union per mask.

    Args:
        pred: Binary masks ``[N, H, W]`` (bool or {0, 1}), numpy or torch.
        gt: Ground-truth masks of the same shape and kind.

    Returns:
        ``(I, U)``, each ``[N]`` int64.
    """
    if pred.shape != gt.shape or pred.ndim < 2:
        raise ValueError(f"expected two [N, H, W] masks of one shape, got {pred.shape} and {gt.shape}")
    if isinstance(pred, torch.Tensor):
        p, g = pred.bool(), gt.bool().to(pred.device)
        inter = (p & g).flatten(-2).sum(-1, dtype=torch.int64)
        union = (p | g).flatten(-2).sum(-1, dtype=torch.int64)
        return inter, union
    p, g = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    return (p & g).sum(axis=(-2, -1), dtype=np.int64), (p | g).sum(axis=(-2, -1), dtype=np.int64)


def mask_iou(pred: ArrayT, gt: ArrayT) -> ArrayT:
    """Mask IoU per sample, ``I / U``, and 0 where ``U == 0``.

    Two empty masks score 0, as in LAVT's evaluation (and pycocotools' ``mask.iou``); RefCOCO targets are
    never empty, so this only matters for synthetic data.

    Args:
        pred: Binary masks ``[N, H, W]``, numpy or torch.
        gt: Ground-truth masks of the same shape and kind.

    Returns:
        IoU ``[N]`` as float64.
    """
    inter, union = mask_intersection_union(pred, gt)
    if isinstance(inter, torch.Tensor):
        return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.zeros_like(inter).double())
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


# --------------------------------------------------------------------------------------------------
# Accumulator
# --------------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Integer running sums for one group of expressions."""

    count: int = 0  # expressions seen
    box_count: int = 0  # expressions with a box prediction
    box_hits: int = 0  # box IoU >= threshold
    box_iou_fx: int = 0  # sum of box IoUs, fixed point
    mask_count: int = 0  # expressions with a mask prediction
    mask_iou_fx: int = 0  # sum of mask IoUs, fixed point
    intersection: int = 0  # total pixels
    union: int = 0  # total pixels

    def add(self, other: _Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Tally:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"bad metric state entry: keys {sorted(data)}, expected {sorted(names)}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in data.values()):
            raise ValueError(f"metric state values must be non-negative ints, got {data}")
        return cls(**data)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        # NOTE: numpy has no bfloat16; float tensors of any width become float64 (exact) before leaving torch.
        x = x.detach().to(torch.float64) if x.is_floating_point() else x.detach()
        return x.cpu().numpy()
    return np.asarray(x)


def _fixed_sum(values: np.ndarray) -> int:
    """Sum of values in [0, 1] as an exact Python int in units of 2**-IOU_FIXED_BITS."""
    fx = np.rint(values.astype(np.float64) * float(2**IOU_FIXED_BITS)).astype(np.int64)
    # NOTE: summed as Python ints; int64 would overflow after 2**15 samples of IoU 1.
    return sum(fx.tolist())


class GroundingMetrics:
    """Accumulates REC and RES metrics, overall and by expression length.

    IoU sums are kept as integers in units of ``2**-48`` (each IoU is rounded by at most ``1.8e-15``), so
    :meth:`merge` is exactly associative and commutative: any split of the samples across workers, merged in
    any order, gives bit-identical results. Counts, intersections and unions are exact integers.

    Args:
        iou_threshold: Box IoU at or above which a prediction counts as correct.
        length_edges: Inclusive upper word counts of all but the last bucket; ``(5, 7, 10)`` gives the
            buckets 1-5, 6-7, 8-10 and 11+ (an empty expression falls in the first bucket).
    """

    def __init__(self, iou_threshold: float = 0.5, length_edges: Sequence[int] = (5, 7, 10)) -> None:
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        edges = [int(e) for e in length_edges]
        if any(e < 1 for e in edges) or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"length_edges must be strictly increasing positive ints, got {list(length_edges)}")
        self.iou_threshold = float(iou_threshold)
        self.length_edges = edges
        self.bucket_names = self._bucket_names(edges)
        self.total = _Tally()
        self.buckets = [_Tally() for _ in self.bucket_names]

    @staticmethod
    def _bucket_names(edges: list[int]) -> list[str]:
        names, low = [], 1
        for high in edges:
            names.append(f"{low}-{high}" if high > low else f"{low}")
            low = high + 1
        return [*names, f"{low}+"]

    def bucket_of(self, words: int) -> int:
        """Index of the length bucket for an expression of ``words`` words."""
        return int(np.searchsorted(self.length_edges, words, side="left"))

    def update(
        self,
        word_counts: Sequence[int] | np.ndarray | torch.Tensor,
        box_iou: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        mask_intersection: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        mask_union: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Adds a batch of expressions.

        Args:
            word_counts: Words per expression ``[N]`` (see :func:`word_count`).
            box_iou: Box IoU per expression ``[N]``, or None for a model without a REC branch.
            mask_intersection: Mask intersection pixels ``[N]``, or None without a RES branch.
            mask_union: Mask union pixels ``[N]``; given exactly when ``mask_intersection`` is.
        """
        words = _to_numpy(word_counts).astype(np.int64).reshape(-1)
        n = words.shape[0]
        if (words < 0).any():
            raise ValueError("word counts must be >= 0")
        if (mask_intersection is None) != (mask_union is None):
            raise ValueError("mask_intersection and mask_union must be given together")
        ious = None if box_iou is None else _to_numpy(box_iou).astype(np.float64).reshape(-1)
        if ious is not None and (ious.shape[0] != n or not np.all((ious >= 0) & (ious <= 1))):
            raise ValueError(f"box_iou must hold {n} values in [0, 1]")
        inter = union = None
        if mask_intersection is not None:
            inter = _to_numpy(mask_intersection).astype(np.int64).reshape(-1)
            union = _to_numpy(mask_union).astype(np.int64).reshape(-1)
            if inter.shape[0] != n or union.shape[0] != n:
                raise ValueError(f"mask_intersection and mask_union must hold {n} values")
            if (inter < 0).any() or (inter > union).any():
                raise ValueError("mask counts must satisfy 0 <= intersection <= union")
        bucket = np.searchsorted(self.length_edges, words, side="left")  # [N]
        for b, tally in enumerate(self.buckets):
            sel = bucket == b
            part = self._tally(sel, ious, inter, union)
            tally.add(part)
            self.total.add(part)

    def _tally(
        self, sel: np.ndarray, ious: np.ndarray | None, inter: np.ndarray | None, union: np.ndarray | None
    ) -> _Tally:
        part = _Tally(count=int(sel.sum()))
        if ious is not None:
            chosen = ious[sel]
            part.box_count = part.count
            part.box_hits = int((chosen >= self.iou_threshold).sum())
            part.box_iou_fx = _fixed_sum(chosen)
        if inter is not None and union is not None:
            i, u = inter[sel], union[sel]
            part.mask_count = part.count
            part.mask_iou_fx = _fixed_sum(np.where(u > 0, i / np.maximum(u, 1), 0.0))
            part.intersection = sum(i.tolist())
            part.union = sum(u.tolist())
        return part

    # ---- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The accumulated state as plain ints, floats, strings and lists (JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            "iou_threshold": self.iou_threshold,
            "length_edges": list(self.length_edges),
            "iou_fixed_bits": IOU_FIXED_BITS,
            "total": asdict(self.total),
            "buckets": [asdict(t) for t in self.buckets],
        }

    def _parse(self, state: dict[str, Any]) -> tuple[_Tally, list[_Tally]]:
        if state.get("version") != _STATE_VERSION or state.get("iou_fixed_bits") != IOU_FIXED_BITS:
            raise ValueError(f"unsupported metric state version {state.get('version')}")
        if float(state["iou_threshold"]) != self.iou_threshold or list(state["length_edges"]) != self.length_edges:
            raise ValueError(
                f"metric state was built with threshold {state['iou_threshold']} and edges "
                f"{state['length_edges']}, this accumulator uses {self.iou_threshold} and {self.length_edges}"
            )
        buckets = [_Tally.from_dict(dict(b)) for b in state["buckets"]]
        if len(buckets) != len(self.buckets):
            raise ValueError(f"metric state has {len(buckets)} buckets, expected {len(self.buckets)}")
        return _Tally.from_dict(dict(state["total"])), buckets

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replaces the accumulated state; the threshold and edges must match this accumulator's."""
        self.total, self.buckets = self._parse(state)

    def merge(self, other_state: dict[str, Any]) -> None:
        """Adds another accumulator's :meth:`state_dict` (e.g. from another worker) to this one."""
        total, buckets = self._parse(other_state)
        self.total.add(total)
        for mine, theirs in zip(self.buckets, buckets):
            mine.add(theirs)

    @classmethod
    def merged(cls, states: Iterable[dict[str, Any]]) -> GroundingMetrics:
        """Builds an accumulator from the sum of several states (which must share their configuration)."""
        states = list(states)
        if not states:
            raise ValueError("merged() needs at least one state")
        out = cls(iou_threshold=states[0]["iou_threshold"], length_edges=states[0]["length_edges"])
        for state in states:
            out.merge(state)
        return out

    # ---- results ----------------------------------------------------------------------------------

    def _metrics(self, t: _Tally) -> dict[str, float]:
        scale = float(2**IOU_FIXED_BITS)
        out: dict[str, float] = {"count": float(t.count)}
        if t.box_count:
            out[f"prec@{self.iou_threshold:g}"] = t.box_hits / t.box_count
            out["mean_box_iou"] = t.box_iou_fx / scale / t.box_count
        if t.mask_count:
            out["miou"] = t.mask_iou_fx / scale / t.mask_count
            out["oiou"] = t.intersection / t.union if t.union else 0.0
        return out

    def compute(self) -> dict[str, float]:
        """Final metrics as fractions in [0, 1].

        Returns:
            ``count`` plus, for the branches that were updated, ``prec@0.5`` and ``mean_box_iou`` (REC),
            ``miou`` and ``oiou`` (RES); the same per length bucket as ``"<key>/len_<bucket>"`` (for example
            ``"miou/len_8-10"``). ``count/len_<bucket>`` is always present; metrics of an empty bucket are
            omitted rather than reported as NaN.
        """
        out = self._metrics(self.total)
        for name, tally in zip(self.bucket_names, self.buckets):
            out.update({f"{key}/len_{name}": value for key, value in self._metrics(tally).items()})
        return out
