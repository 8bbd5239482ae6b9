"""The demo's own logic: what it reuses, and the overlay it draws from a real response's mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jobs import demo
from pipelines.serve.client import GroundingResult


def test_box_iou() -> None:
    assert demo._box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == pytest.approx(1.0)
    assert demo._box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert demo._box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0


def test_dataset_is_reused_only_with_the_demo_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "REPO", tmp_path)
    assert not demo._dataset_matches()
    stats = tmp_path / demo.RAW / "synthetic" / "generator.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"config": {**demo.SYNTH, "image_width": 320}}))
    assert demo._dataset_matches()
    stats.write_text(json.dumps({"config": {**demo.SYNTH, "max_objects": 6}}))
    assert not demo._dataset_matches()


def test_overlay_draws_the_answer(tmp_path: Path) -> None:
    image = tmp_path / "scene.jpg"
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(image)
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 20:50] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    body = {
        "box": [20, 10, 50, 30],
        "box_normalized": [0.25, 1 / 6, 0.625, 0.5],
        "mask": {"format": "rle", "size": rle["size"], "counts": rle["counts"].decode()},
        "mask_area": int(mask.sum()),
        "threshold": 0.35,
        "image": {"width": 80, "height": 60},
        "expression": "the grey square",
        "truncated": False,
        "model": {"name": "m", "version": "1"},
    }
    answer = GroundingResult.from_response(body)  # as the client returns a real response
    query = {"image": image, "expression": "the grey square", "box": [18, 8, 52, 32]}
    out = demo._draw([query, query], [answer, answer], [0.8, 0.1], tmp_path / "out" / "queries.png")
    drawn = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert drawn.shape[1] == 2 * 320  # two tiles side by side
    # The predicted mask is tinted red: the middle of the masked area is redder than the background.
    scale, top = 320 / 80, (320 - 240) // 2  # the 80 x 60 image fills the 320 tile's width, centred vertically
    for left in (0, 320):
        inside = drawn[top + int(20 * scale), left + int(35 * scale)]
        outside = drawn[top + int(50 * scale), left + int(10 * scale)]
        assert inside[0] - inside[1] > 40 and abs(outside[0] - outside[1]) < 10


def test_captions_say_hit_at_half_iou_as_prec_at_half_counts() -> None:
    query = {"expression": "the red star"}
    assert demo._caption(query, 0.5) == 'hit (IoU 0.50): "the red star"'
    assert demo._caption(query, 0.4999) == 'miss (IoU 0.50): "the red star"'


def test_held_out_sample_is_drawn_by_seed_from_testb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    from pipelines.data import parquet

    expressions = [f"expression {i}" for i in range(40)]
    table = pa.table(
        {
            "expression": expressions,
            "file_name": [f"image_{i}.jpg" for i in range(40)],
            "box_xywh": [[float(i), 2.0, 10.0, 20.0] for i in range(40)],
        }
    )
    asked = []

    def read_split_table(root: Path, split: str, columns: list[str]) -> pa.Table:
        asked.append(split)
        return table.select(columns)

    monkeypatch.setattr(parquet, "read_split_table", read_split_table)
    monkeypatch.setattr(demo, "REPO", tmp_path)
    sample = demo._held_out_sample(8, seed=0)
    assert asked == ["testB"]
    # numpy's seeded draw, as an independent reference for which rows the seed picks
    rows = sorted(np.random.default_rng(0).choice(40, size=8, replace=False))
    assert [q["expression"] for q in sample] == [expressions[i] for i in rows]
    i = rows[0]
    assert sample[0]["box"] == [float(i), 2.0, i + 10.0, 22.0]  # xywh -> xyxy
    assert sample[0]["image"] == tmp_path / demo.RAW / "images" / f"image_{i}.jpg"
    assert [q["expression"] for q in demo._held_out_sample(8, seed=1)] != [q["expression"] for q in sample]
    assert len(demo._held_out_sample(100, seed=0)) == 40  # a small split gives all it has


def test_the_summary_links_the_experiment_in_the_training_view(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.train.config import load_config

    db = tmp_path / "mlflow.db"
    assert demo._experiment_link(db) == "http://127.0.0.1:5000"  # no demo experiment yet: the UI's start page
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    client.create_experiment("another")
    experiment_id = client.create_experiment(load_config(demo.REPO / demo.CONFIG).run.experiment)
    expected = f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
    assert demo._experiment_link(db) == expected
