"""REFER reader: records, quirks, refused paths and pickles, masks equal to pycocotools' decoding."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipelines.data.refer import ReferDataset, ReferSource, UnsafeImagePathError, resolve_image_path
from pipelines.data.segmentation import SegmentationError, rle_string_counts, segmentation_to_rle
from tests.pipelines.quirky_refer import MOJIBAKE, UNICODE_EXPRESSION, QuirkyRefer
from vglaw.rle import decode_rle
from vglaw.safe_pickle import UnsafePickleError


def _load(q: QuirkyRefer) -> ReferDataset:
    return ReferDataset.load(ReferSource(q.refer_root, "refcoco", "unc", q.image_root))


def test_one_record_per_sentence_with_the_right_split_and_text(quirky_refer: QuirkyRefer) -> None:
    ds = _load(quirky_refer)
    got = {(e.ref_id, e.sent_id): (e.split, e.expression, e.ann_id, e.image_id) for e in ds}
    assert len(got) == len(ds.expressions)  # no duplicates
    # The reader keeps everything whose annotation data is present; image-level failures come later.
    reader_lost = {s for p in ds.problems for s in p.sent_ids}
    for key, value in quirky_refer.expected.items():
        assert got[key] == value
    assert set(got) | reader_lost >= set(quirky_refer.expected)
    assert len(got) + len(reader_lost) == quirky_refer.total_sentences


def test_image_file_comes_from_instances_not_from_the_ref(quirky_refer: QuirkyRefer) -> None:
    ds = _load(quirky_refer)
    first = next(e for e in ds if e.image_id == 1)
    assert first.image.file_name == "COCO_train2014_000000000001.jpg"
    assert (quirky_refer.image_root / first.image.file_name).is_file()


def test_unicode_long_and_python2_text(quirky_refer: QuirkyRefer) -> None:
    texts = {e.expression for e in _load(quirky_refer)}
    assert UNICODE_EXPRESSION in texts
    assert "naïve man" in texts and MOJIBAKE not in texts
    assert max(len(t) for t in texts) > 2000  # the over-long one, untruncated


def test_problems_are_listed_with_reasons(quirky_refer: QuirkyRefer) -> None:
    problems = _load(quirky_refer).problems
    reasons = {p.ref_id: p.reason for p in problems}
    assert "escapes" in reasons[13]
    assert "not in instances" in reasons[14]
    assert sum(p.expressions_lost for p in problems) == 2


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../x.jpg", "a/../../x.jpg", "C:\\x.jpg", "\\\\server\\share\\x.jpg", "", "a\x00b"],
)
def test_unsafe_image_paths_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeImagePathError):
        resolve_image_path(tmp_path, name)


def test_safe_image_paths_resolve_inside_the_root(tmp_path: Path) -> None:
    assert resolve_image_path(tmp_path, "25/25466.jpg") == tmp_path / "25" / "25466.jpg"
    assert resolve_image_path(tmp_path, "a/./b.jpg").is_relative_to(tmp_path)


def test_unknown_dataset_or_split_by_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        ReferSource(tmp_path, "refcocoX", "unc", tmp_path)
    with pytest.raises(ValueError, match="no split_by"):
        ReferSource(tmp_path, "refcocog", "unc", tmp_path)
    for dataset, split_by in [("refcoco", "google"), ("refcocog", "umd"), ("refclef", "berkeley")]:
        ReferSource(tmp_path, dataset, split_by, tmp_path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Exploit(marker)], protocol=2))
    (tmp_path / "refcoco" / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(UnsafePickleError, match="system"):
        ReferDataset.load(ReferSource(tmp_path, "refcoco", "unc", tmp_path))
    assert not marker.exists()


def test_masks_equal_pycocotools_own_decoding(quirky_refer: QuirkyRefer) -> None:
    coco = COCO(str(quirky_refer.refer_root / "refcoco" / "instances.json"))
    checked = 0
    for ann in quirky_refer.instances["annotations"]:
        img = coco.imgs[ann["image_id"]]
        if ann["id"] == 502:  # the deliberately broken one
            with pytest.raises(SegmentationError):
                segmentation_to_rle(ann["segmentation"], img["height"], img["width"])
            continue
        rle = segmentation_to_rle(ann["segmentation"], img["height"], img["width"])
        np.testing.assert_array_equal(decode_rle(rle["counts"], rle["size"]), coco.annToMask(ann))
        checked += 1
    assert checked == len(quirky_refer.instances["annotations"]) - 1


def test_corrupt_compressed_rle_is_refused() -> None:
    for bad in ["zzzz", "0", "", "P1370000"]:
        with pytest.raises(SegmentationError):
            segmentation_to_rle({"size": [10, 10], "counts": bad}, 10, 10)
    with pytest.raises(SegmentationError, match="differs"):
        segmentation_to_rle({"size": [9, 10], "counts": "P13700000l0"}, 10, 10)
    assert sum(rle_string_counts(b"P13700000l0")) == 100
