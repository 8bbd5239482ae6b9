"""Ray Data preprocessing on the quirky REFER dataset: exactly-once rows, skips, round trips, atomicity."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO

from jobs.preprocess import build_parser
from jobs.preprocess import main as preprocess_main
from pipelines.data.manifest import read_manifest
from pipelines.data.parquet import decode_row, read_split, read_split_table
from pipelines.data.preprocess import PreprocessConfig, StrictModeError, run_preprocess
from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic
from pipelines.runtime import file_sha256
from tests.pipelines.quirky_refer import QuirkyRefer
from vglaw.geometry import xywh_to_xyxy

SIZE = 448  # the model's input size: the round-trip tolerances below are stated for it


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(q: QuirkyRefer, out: Path, **kwargs: Any) -> PreprocessConfig:
    base: dict[str, Any] = dict(image_size=SIZE, rows_per_file=4, images_per_task=2)
    base.update(kwargs)
    return PreprocessConfig("refcoco", "unc", q.refer_root, q.image_root, out, **base)


@pytest.fixture(scope="module")
def processed(ray_local: None, quirky_refer: QuirkyRefer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("processed") / "refcoco_unc"
    run_preprocess(_config(quirky_refer, out))
    return out


def _all_rows(out: Path) -> list[dict[str, Any]]:
    manifest = read_manifest(out)
    return [row for split in manifest["splits"] for row in read_split_table(out, split).to_pylist()]


def test_every_expression_exactly_once_with_its_split(processed: Path, quirky_refer: QuirkyRefer) -> None:
    rows = _all_rows(processed)
    keys = [(r["ref_id"], r["sent_id"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(quirky_refer.expected)
    for r in rows:
        split, text, ann_id, image_id = quirky_refer.expected[(r["ref_id"], r["sent_id"])]
        assert (r["split"], r["expression"], r["ann_id"], r["image_id"]) == (split, text, ann_id, image_id)


def test_skips_are_listed_with_reasons_and_nothing_else_is_lost(processed: Path, quirky_refer: QuirkyRefer) -> None:
    manifest = read_manifest(processed)
    lost = {sent: item["reason"] for item in manifest["skipped"] for sent in item["sent_ids"]}
    assert set(lost) == set(quirky_refer.lost)
    for sent, word in quirky_refer.lost.items():
        assert word in lost[sent], (sent, lost[sent])
    by_file = {item["file_name"]: item["reason"] for item in manifest["skipped"] if item["ann_id"] is None}
    assert "not found" in by_file["missing.jpg"]
    assert "does not decode" in by_file["truncated.jpg"]
    assert manifest["total_rows"] + len(lost) == quirky_refer.total_sentences


def test_boxes_and_masks_equal_pycocotools(processed: Path, quirky_refer: QuirkyRefer) -> None:
    coco = COCO(str(quirky_refer.refer_root / "refcoco" / "instances.json"))
    for row in _all_rows(processed):
        ann = coco.anns[row["ann_id"]]
        decoded = decode_row(row)
        np.testing.assert_allclose(decoded.box_xywh, ann["bbox"])
        np.testing.assert_array_equal(decoded.mask, coco.annToMask(ann))


def test_inverse_letterbox_recovers_boxes_and_masks(processed: Path) -> None:
    for row in _all_rows(processed):
        d = decode_row(row)
        box = d.letterbox.box_from_normalized_cxcywh(d.box_cxcywh_norm)
        assert np.abs(box - xywh_to_xyxy(d.box_xywh)).max() <= 1.0
        back = d.letterbox.mask_from_canvas(d.mask_canvas.astype(np.float32)) >= 0.5
        truth = d.mask.astype(bool)
        iou = (back & truth).sum() / max(1, (back | truth).sum())
        assert iou > 0.99, (row["file_name"], iou)


def test_images_of_every_mode_become_rgb_canvases(processed: Path) -> None:
    seen = set()
    for row in _all_rows(processed):
        d = decode_row(row, masks=False)
        assert d.image.shape == (SIZE, SIZE, 3) and d.image.dtype == np.uint8
        lb = d.letterbox
        if lb.pad_x >= 16:  # black padding, away from the JPEG ringing at the image edge
            assert d.image[:, : lb.pad_x - 8].max() <= 8
        if row["file_name"] == "grey.jpg":
            inner = d.image[lb.pad_y + 2 : lb.pad_y + lb.new_h - 2, 2:-2].astype(int)
            assert np.abs(inner[..., 0] - inner[..., 1]).max() <= 6
        seen.add(row["file_name"])
    expected = {"COCO_train2014_000000000001.jpg", "grey.jpg", "cmyk.jpg", "sub/palette.png", "alpha.png"}
    assert expected | {"tall.png", "wide.jpg", "deep.png"} <= seen


def test_manifest_records_provenance(processed: Path, quirky_refer: QuirkyRefer) -> None:
    manifest = read_manifest(processed)
    assert manifest["schema_version"] == 1 and manifest["image_size"] == SIZE
    assert manifest["dataset"] == "refcoco" and manifest["split_by"] == "unc"
    refs = quirky_refer.refer_root / "refcoco" / "refs(unc).p"
    assert manifest["source_files"]["refs(unc).p"] == file_sha256(refs)
    assert {"created_at", "code_version", "splits", "skipped"} <= manifest.keys()
    for split, info in manifest["splits"].items():
        assert info["rows"] == sum(info["files"].values())
        assert all(n <= 4 for n in info["files"].values())  # rows_per_file
        assert (processed / split).is_dir()


def test_read_split_with_ray_matches_the_table(processed: Path) -> None:
    ds = read_split(processed, "train", columns=["ref_id", "sent_id", "split"])
    table = read_split_table(processed, "train")
    assert ds.count() == table.num_rows
    rows = ds.take_all()
    assert {r["split"] for r in rows} == {"train"}
    assert sorted((r["ref_id"], r["sent_id"]) for r in rows) == sorted(
        zip(table.column("ref_id").to_pylist(), table.column("sent_id").to_pylist())
    )
    # One block per file, as the manifest lists them: the decode downstream then runs as that many tasks.
    files = read_manifest(processed)["splits"]["train"]["files"]
    assert len(files) > 1
    assert ds.materialize().num_blocks() == len(files)


def test_strict_mode_fails_and_writes_nothing(ray_local: None, quirky_refer: QuirkyRefer, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    with pytest.raises(StrictModeError) as caught:
        run_preprocess(_config(quirky_refer, out, strict=True))
    # The message itself, not the remote traceback's quote of the source line that formats it.
    assert re.fullmatch(r"strict mode: .+ \(ref \(\d+,\)\)", str(caught.value)), caught.value  # the reader's
    assert not out.exists()
    assert not list(tmp_path.glob(".strict*"))


def test_existing_output_is_refused_or_replaced_atomically(
    processed: Path, quirky_refer: QuirkyRefer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "stale.parquet").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        run_preprocess(_config(quirky_refer, out))
    assert (out / "train" / "stale.parquet").exists()
    manifest = run_preprocess(_config(quirky_refer, out, overwrite=True, rows_per_file=100))
    assert not (out / "train" / "stale.parquet").exists()
    assert json.loads((out / "manifest.json").read_text())["total_rows"] == manifest["total_rows"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left behind


def test_cli_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    with pytest.raises(SystemExit):
        preprocess_main(["--help"])
    text = capsys.readouterr().out
    for flag in ["--dataset", "--split-by", "--refer-root", "--image-root", "--out", "--image-size",
                 "--rows-per-file", "--strict", "--overwrite"]:  # fmt: skip
        assert flag in text


def test_cli_preprocesses_the_synthetic_dataset_end_to_end(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = generate_synthetic(tmp_path / "syn", SyntheticConfig(num_images=12, seed=3))
    out = tmp_path / "processed"
    argv = ["--refer-root", str(tmp_path / "syn"), "--out", str(out), "--image-size", "128"]
    assert preprocess_main(argv) == 0
    manifest = read_manifest(out)
    assert manifest["skipped"] == []
    expressions = sum(v for k, v in summary["counts"].items() if k.startswith("expressions/"))
    assert manifest["total_rows"] == expressions
    assert preprocess_main(argv) == 1  # refuses to overwrite

    # --strict on an image only the encoder (a Ray task) finds broken: the error is the message, formatted.
    (tmp_path / "syn" / "images" / "synthetic_000004.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    capsys.readouterr()
    assert preprocess_main([*argv[:3], str(tmp_path / "strict"), *argv[4:], "--strict"]) == 1
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert re.fullmatch(r"error: strict mode: image \d+ \(synthetic_000004\.jpg\): .+", error), error
    assert not (tmp_path / "strict").exists()


def test_a_killed_encoder_worker_loses_and_duplicates_nothing(ray_local: None, tmp_path: Path) -> None:
    import psutil

    summary = generate_synthetic(tmp_path / "syn", SyntheticConfig(num_images=120, seed=5))
    corrupt = "synthetic_000007.jpg"  # one skip, which a retried task must neither lose nor repeat
    (tmp_path / "syn" / "images" / corrupt).write_bytes(b"\xff\xd8 not a jpeg")
    config = PreprocessConfig(
        "synthetic", "unc", tmp_path / "syn", tmp_path / "syn" / "images", tmp_path / "out", images_per_task=4
    )
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(manifest=run_preprocess(config)))
    job.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            if any("MapBatches(_encode_batch)" in part for part in proc.info["cmdline"] or []):
                proc.kill()  # SIGKILL, mid-task
                killed = proc.pid
                break
        time.sleep(0.02)
    job.join(timeout=300)
    assert killed is not None, "no encoder worker was seen running"
    manifest = result["manifest"]  # the job finished despite the kill
    expressions = sum(v for k, v in summary["counts"].items() if k.startswith("expressions/"))
    [skip] = manifest["skipped"]
    assert skip["file_name"] == corrupt and skip["ann_id"] is None and "does not decode" in skip["reason"]
    assert manifest["total_rows"] == expressions - skip["expressions_lost"] > 0
    keys = [(r["split"], r["sent_id"]) for r in _all_rows(config.out)]
    assert len(keys) == len(set(keys)) == manifest["total_rows"]  # a retried task overwrote its own files


def test_a_retried_chunk_rewrites_its_skips_rather_than_repeating(quirky_refer: QuirkyRefer, tmp_path: Path) -> None:
    from pipelines.data.encode import build_image_tasks, pack_tasks
    from pipelines.data.preprocess import _encode_batch, _read_chunk_records
    from pipelines.data.refer import ReferDataset

    config = _config(quirky_refer, tmp_path / "out")
    tasks = build_image_tasks(ReferDataset.load(config.source))
    batch = {"chunk": np.array([7]), "tasks": np.array([pack_tasks(tasks)], dtype=object)}
    kwargs = dict(image_root=str(quirky_refer.image_root), image_size=64, image_format="jpeg", strict=False)
    first = _encode_batch(batch, **kwargs, chunk_dir=str(tmp_path))
    again = _encode_batch(batch, **kwargs, chunk_dir=str(tmp_path))  # as Ray does after a lost worker
    assert first.equals(again) and first.num_rows > 0
    assert [p.name for p in tmp_path.glob("chunk-*")] == ["chunk-000007.json"]
    skips, nodes = _read_chunk_records(tmp_path)
    assert skips and len({json.dumps(s, sort_keys=True) for s in skips}) == len(skips)
    assert list(nodes.values()) == [len(tasks)]  # the chunk's images, counted once, on one node
