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
    out = demo._draw(query, answer, tmp_path / "out" / "query.png")
    drawn = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert drawn.shape[1] == 512
    # The predicted mask is tinted red: the middle of the masked area is redder than the background.
    scale, top = 512 / 80, (512 - 384) // 2  # the 80 x 60 image fills the 512 tile's width, centred vertically
    inside = drawn[top + int(20 * scale), int(35 * scale)]
    outside = drawn[top + int(50 * scale), int(10 * scale)]
    assert inside[0] - inside[1] > 40 and abs(outside[0] - outside[1]) < 10


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
