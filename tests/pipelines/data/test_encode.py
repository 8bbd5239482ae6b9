"""Planning the preprocessing work: chunks per split in run order, task packing, the paused collector."""

from __future__ import annotations

import gc
import itertools
from pathlib import Path

import pytest

from pipelines.data.encode import ImageTask, build_image_tasks, chunk_by_split, pack_tasks, unpack_tasks
from pipelines.data.refer import ReferDataset, ReferSource
from pipelines.runtime import gc_paused
from tests.pipelines.quirky_refer import QuirkyRefer


def _tasks(per_split: dict[str, int]) -> list[ImageTask]:
    ids = itertools.count()
    return [ImageTask(next(ids), split, f"{split}.jpg", 8, 8) for split, n in per_split.items() for _ in range(n)]


@pytest.mark.parametrize(
    ("per_split", "size", "workers"),
    [
        ({"train": 1600, "val": 200, "testA": 100, "testB": 100}, 128, 2),
        ({"train": 1600, "val": 200, "testA": 100, "testB": 100}, 64, 16),
        ({"train": 7, "val": 3}, 4, 2),
        ({"train": 5}, 1, 3),
        ({"val": 300}, 128, 1),
    ],
)
def test_chunks_cover_every_task_once_in_one_split_each(per_split: dict[str, int], size: int, workers: int) -> None:
    tasks = _tasks(per_split)
    chunks = chunk_by_split(tasks, size, workers)
    assert sorted(t.image_id for chunk in chunks for t in chunk) == [t.image_id for t in tasks]
    for chunk in chunks:
        assert 1 <= len(chunk) <= size
        assert len({t.split for t in chunk}) == 1
    for split in per_split:  # within a split, the tasks keep their order
        in_order = [t.image_id for chunk in chunks for t in chunk if t.split == split]
        assert in_order == sorted(in_order)


def test_chunks_start_full_and_shrink_towards_the_end() -> None:
    size, workers = 128, 2
    chunks = chunk_by_split(_tasks({"train": 1600, "val": 200, "testA": 100, "testB": 100}), size, workers)
    sizes = [len(c) for c in chunks]
    assert sizes[:10] == [size] * 10  # the bulk runs in full chunks
    assert max(sizes[-2 * workers :]) <= size // 4  # the last round is small, so the workers end together
    last_of_split = {max(i for i, c in enumerate(chunks) if c[0].split == s) for s in {c[0].split for c in chunks}}
    assert all(len(c) >= size // 8 for i, c in enumerate(chunks) if i not in last_of_split)
    assert chunks[0][0].split == "train"  # the largest split first


def test_one_worker_still_gets_full_chunks_first() -> None:
    sizes = [len(c) for c in chunk_by_split(_tasks({"train": 1000}), 64, 1)]
    assert sizes[0] == 64 and sum(sizes) == 1000 and min(sizes[:-1]) >= 8


def _source(q: QuirkyRefer) -> ReferSource:
    return ReferSource(q.refer_root, "refcoco", "unc", q.image_root)


def test_packed_tasks_come_back_equal(quirky_refer: QuirkyRefer) -> None:
    tasks = build_image_tasks(ReferDataset.load(_source(quirky_refer)))
    assert tasks
    back = unpack_tasks(pack_tasks(tasks))
    assert back == tasks
    assert all(isinstance(ann_id, int) for t in back for ann_id in t.annotations)
    assert unpack_tasks(pack_tasks([])) == []


def test_gc_paused_restores_the_collector() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before, so it stays off
    finally:
        gc.enable()


def test_refer_loading_leaves_the_collector_on_even_when_it_fails(quirky_refer: QuirkyRefer, tmp_path: Path) -> None:
    ReferDataset.load(_source(quirky_refer))
    assert gc.isenabled()
    broken = tmp_path / "refcoco"
    broken.mkdir()
    (broken / "refs(unc).p").write_bytes(b"not a pickle")
    with pytest.raises(Exception):  # noqa: B017 - which unpickling error does not matter here
        ReferDataset.load(ReferSource(tmp_path, "refcoco", "unc", tmp_path))
    assert gc.isenabled()
