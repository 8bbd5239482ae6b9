"""Tests for vglaw.metrics against torchvision and pycocotools, and for the mergeable accumulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from vglaw.metrics import GroundingMetrics, box_iou_paired, mask_intersection_union, mask_iou, word_count


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 40, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)  # [n, 4]


def _coco_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    out = []
    for p, g in zip(pred, gt):
        rp = mask_utils.encode(np.asfortranarray(p.astype(np.uint8)))
        rg = mask_utils.encode(np.asfortranarray(g.astype(np.uint8)))
        out.append(mask_utils.iou([rp], [rg], [0])[0, 0])
    return np.array(out)


# ---- pairwise functions --------------------------------------------------------------------------


def test_box_iou_paired_matches_torchvision_diagonal() -> None:
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 50), _random_boxes(rng, 50)
    b[:5] = a[:5]  # perfect overlap
    b[5:10] = a[5:10] + 500  # disjoint
    ref = torch.diagonal(box_iou(torch.from_numpy(a), torch.from_numpy(b))).numpy()
    np.testing.assert_allclose(box_iou_paired(a, b), ref, atol=1e-12)
    np.testing.assert_allclose(box_iou_paired(a[:5], b[:5]), 1.0)
    assert (box_iou_paired(a[5:10], b[5:10]) == 0).all()
    t = box_iou_paired(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), ref, atol=1e-6)
    assert ((ref[10:] > 0.05) & (ref[10:] < 0.95)).sum() >= 20  # most random pairs overlap partially


def test_box_iou_paired_degenerate_boxes_give_zero_not_nan() -> None:
    a = np.array([[1.0, 1, 1, 1], [0, 0, 0, 5], [0, 0, 10, 10]])
    b = np.array([[1.0, 1, 1, 1], [0, 0, 0, 5], [5, 5, 5, 5]])
    np.testing.assert_array_equal(box_iou_paired(a, b), [0.0, 0.0, 0.0])
    assert not torch.isnan(box_iou_paired(torch.from_numpy(a), torch.from_numpy(b))).any()


def test_box_iou_paired_batched_shape() -> None:
    a = torch.rand(2, 3, 4).sort(dim=-1).values[..., [0, 1, 2, 3]]
    assert box_iou_paired(a, a).shape == (2, 3)
    with pytest.raises(ValueError):
        box_iou_paired(np.zeros((3, 4)), np.zeros((2, 4)))


def test_mask_iou_matches_pycocotools() -> None:
    rng = np.random.default_rng(1)
    n, h, w = 12, 23, 31
    pred = rng.random((n, h, w)) > 0.5
    gt = rng.random((n, h, w)) > 0.4
    gt[0] = pred[0]  # perfect overlap
    pred[1] = False  # empty prediction
    pred[2] = gt[2] = False  # both empty: IoU 0, as in LAVT and pycocotools
    gt[3] = False  # empty ground truth
    ref = _coco_iou(pred, gt)
    ours = mask_iou(pred, gt)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert ours[0] == 1.0 and ours[1] == 0.0 and ours[2] == 0.0 and ours[3] == 0.0
    t = mask_iou(torch.from_numpy(pred), torch.from_numpy(gt))
    np.testing.assert_allclose(t.numpy(), ref, atol=1e-12)


def test_mask_intersection_union_counts() -> None:
    pred = np.zeros((2, 4, 4), bool)
    gt = np.zeros((2, 4, 4), np.uint8)
    pred[0, :2] = True  # 8 px
    gt[0, 1:3] = 1  # 8 px, 4 shared
    i, u = mask_intersection_union(pred, gt)
    assert i.dtype == np.int64 and u.dtype == np.int64
    np.testing.assert_array_equal(i, [4, 0])
    np.testing.assert_array_equal(u, [12, 0])
    ti, tu = mask_intersection_union(torch.from_numpy(pred), torch.from_numpy(gt))
    assert ti.dtype == torch.int64 and ti.tolist() == [4, 0] and tu.tolist() == [12, 0]


def test_word_count() -> None:
    assert word_count("the man on the left") == 5
    assert word_count("  spaced\tout \n words ") == 3
    assert word_count("") == 0


# ---- accumulator ---------------------------------------------------------------------------------


def _samples(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    union = rng.integers(0, 5000, n)
    union[:3] = 0  # a few empty/empty pairs
    return {
        "word_counts": rng.integers(0, 20, n),
        "box_iou": np.concatenate([[0.5, 0.4999999], rng.random(n - 2)]),
        "mask_intersection": (union * rng.random(n)).astype(np.int64),
        "mask_union": union,
    }


def test_accumulator_against_direct_computation() -> None:
    s = _samples(0, 400)
    m = GroundingMetrics()
    m.update(**s)
    out = m.compute()
    mious = np.where(s["mask_union"] > 0, s["mask_intersection"] / np.maximum(s["mask_union"], 1), 0.0)
    assert out["count"] == 400
    assert out["prec@0.5"] == pytest.approx(np.mean(s["box_iou"] >= 0.5), abs=1e-15)
    assert out["mean_box_iou"] == pytest.approx(s["box_iou"].mean(), abs=1e-12)
    assert out["miou"] == pytest.approx(mious.mean(), abs=1e-12)
    assert out["oiou"] == pytest.approx(s["mask_intersection"].sum() / s["mask_union"].sum(), abs=1e-15)
    edges = [(0, 5, "1-5"), (6, 7, "6-7"), (8, 10, "8-10"), (11, 10**9, "11+")]
    assert sum(out[f"count/len_{name}"] for *_, name in edges) == 400
    for low, high, name in edges:
        sel = (s["word_counts"] >= low) & (s["word_counts"] <= high)
        assert out[f"count/len_{name}"] == sel.sum()
        assert out[f"prec@0.5/len_{name}"] == pytest.approx(np.mean(s["box_iou"][sel] >= 0.5), abs=1e-15)
        assert out[f"miou/len_{name}"] == pytest.approx(mious[sel].mean(), abs=1e-12)


@pytest.mark.parametrize("parts", [2, 3])
def test_merge_of_splits_equals_one_accumulator(parts: int) -> None:
    s = _samples(parts, 301)
    whole = GroundingMetrics()
    whole.update(**s)
    rng = np.random.default_rng(10 + parts)
    assignment = rng.integers(0, parts, 301)
    states = []
    for k in range(parts):
        shard = GroundingMetrics()
        sel = assignment == k
        # Several updates per shard, including an empty one.
        for chunk in np.array_split(np.nonzero(sel)[0], 3):
            shard.update(**{key: value[chunk] for key, value in s.items()})
        states.append(shard.state_dict())
    expected = whole.compute()
    forward, backward = GroundingMetrics.merged(states), GroundingMetrics.merged(states[::-1])
    for merged in (forward, backward):
        got = merged.compute()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if key.startswith("count"):
                assert got[key] == value, key
            else:
                assert got[key] == pytest.approx(value, abs=1e-12), key
    # Fixed-point sums make merging exact, not just close.
    assert forward.state_dict() == backward.state_dict() == whole.state_dict()
    incremental = GroundingMetrics()
    for state in states:
        incremental.merge(state)
    assert incremental.state_dict() == whole.state_dict()


def test_state_json_round_trip() -> None:
    m = GroundingMetrics(iou_threshold=0.7, length_edges=(3, 9))
    m.update(**_samples(4, 50))
    state = json.loads(json.dumps(m.state_dict()))
    restored = GroundingMetrics(iou_threshold=0.7, length_edges=[3, 9])
    restored.load_state_dict(state)
    assert restored.compute() == m.compute()
    assert "prec@0.7" in m.compute() and "count/len_4-9" in m.compute() and "count/len_10+" in m.compute()
    with pytest.raises(ValueError):
        GroundingMetrics().load_state_dict(state)  # different threshold and edges
    with pytest.raises(ValueError):
        GroundingMetrics.merged([])


@pytest.mark.parametrize(
    "words,bucket",
    [(0, "1-5"), (1, "1-5"), (5, "1-5"), (6, "6-7"), (7, "6-7"), (8, "8-10"), (10, "8-10"), (11, "11+")],
)
def test_bucket_edges(words: int, bucket: str) -> None:
    m = GroundingMetrics()
    m.update(word_counts=[words], box_iou=[1.0])
    out = m.compute()
    assert out[f"count/len_{bucket}"] == 1
    assert out[f"prec@0.5/len_{bucket}"] == 1.0
    others = [name for name in m.bucket_names if name != bucket]
    assert all(out[f"count/len_{name}"] == 0 for name in others)
    assert all(f"prec@0.5/len_{name}" not in out for name in others)


def test_rec_only_and_res_only() -> None:
    rec = GroundingMetrics()
    rec.update(word_counts=[3, 4], box_iou=torch.tensor([0.6, 0.2]))
    out = rec.compute()
    assert out["prec@0.5"] == 0.5 and "miou" not in out and "oiou" not in out
    res = GroundingMetrics()
    res.update(word_counts=[3, 4], mask_intersection=[5, 0], mask_union=[10, 10])
    out = res.compute()
    assert out["miou"] == 0.25 and out["oiou"] == 0.25 and "prec@0.5" not in out


def test_update_validation() -> None:
    m = GroundingMetrics()
    with pytest.raises(ValueError):
        m.update(word_counts=[1, 2], box_iou=[0.5])
    with pytest.raises(ValueError):
        m.update(word_counts=[1], box_iou=[1.5])
    with pytest.raises(ValueError):
        m.update(word_counts=[1], mask_intersection=[3])
    with pytest.raises(ValueError):
        m.update(word_counts=[1], mask_intersection=[3], mask_union=[2])
    with pytest.raises(ValueError):
        GroundingMetrics(length_edges=(5, 5, 10))
    with pytest.raises(ValueError):
        GroundingMetrics(iou_threshold=0.0)
