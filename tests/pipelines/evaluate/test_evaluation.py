"""Evaluation: per-row scores against a direct computation, actor-count invariance, the report and the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import vglaw
from pipelines.data.manifest import read_manifest
from pipelines.data.parquet import letterbox_of, read_split_table
from pipelines.data.preprocess import PreprocessConfig, run_preprocess
from pipelines.data.schema import EVAL_COLUMNS
from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic
from pipelines.evaluate.inference import evaluate_splits
from pipelines.evaluate.report import overlay_examples, overlay_grid, wrap_caption
from pipelines.evaluate.scoring import accumulate, evaluate_batches, evaluate_rows
from pipelines.evaluate.stage import EvaluationConfig, run_evaluation
from vglaw.metrics import GroundingMetrics

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (2 CPUs, as on the test machine)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Path:
    """A small synthetic dataset at the tiny preset's 128 px, several Parquet files per split."""
    root = tmp_path_factory.mktemp("eval-data")
    config = SyntheticConfig(num_images=10, image_width=96, image_height=72, split_fractions=(0.4, 0.3, 0.2, 0.1))
    generate_synthetic(root / "raw", config)
    run_preprocess(
        PreprocessConfig(
            dataset="synthetic",
            split_by="unc",
            refer_root=root / "raw",
            image_root=root / "raw" / "images",
            out=root / "out",
            image_size=128,
            rows_per_file=10,
        )
    )
    return root / "out"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """An untrained tiny model with a tokenizer fitted to the dataset's expressions."""
    torch.manual_seed(0)
    expressions = read_split_table(data_dir, "train", columns=["expression"]).column("expression").to_pylist()
    tokenizer = vglaw.ExpressionTokenizer.train(expressions, vocab_size=500)
    model = vglaw.create_model("tiny", vocab_size=tokenizer.vocab_size)
    return vglaw.save_pretrained(model, tokenizer, tmp_path_factory.mktemp("eval-model") / "model")


def test_rows_agree_with_predictor_and_pycocotools(model_dir: Path, data_dir: Path) -> None:
    predictor = vglaw.Predictor.from_pretrained(model_dir)
    table = read_split_table(data_dir, "val", columns=list(EVAL_COLUMNS)).slice(0, 6)
    results = evaluate_rows(predictor, table)

    rows = table.to_pylist()
    fits = [letterbox_of(r) for r in rows]
    canvases = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))) for r in rows]
    ).permute(0, 3, 1, 2)
    direct = predictor.predict_letterboxed(canvases, fits, [r["expression"] for r in rows])
    for i, (row, g) in enumerate(zip(rows, direct)):
        gt_rle = {"size": list(row["mask_size"]), "counts": row["mask_rle"]}
        pred_rle = mask_utils.encode(np.asfortranarray(g.mask.astype(np.uint8)))
        inter = mask_utils.area(mask_utils.merge([pred_rle, gt_rle], intersect=True))
        union = mask_utils.area(mask_utils.merge([pred_rle, gt_rle], intersect=False))
        x0, y0, x1, y1 = g.box
        box_iou = mask_utils.iou([[x0, y0, x1 - x0, y1 - y0]], [list(row["box_xywh"])], [0])[0, 0]
        assert results["mask_intersection"][i] == inter and results["mask_union"][i] == union
        assert results["pred_mask_area"][i] == g.mask.sum()
        assert results["box_iou"][i] == pytest.approx(box_iou, abs=1e-9)
        np.testing.assert_allclose(results["pred_box_xyxy"][i], g.box)
        assert results["word_count"][i] == len(row["expression"].split())
        assert results["sent_id"][i] == row["sent_id"] and results["ref_id"][i] == row["ref_id"]


def test_batch_forms_and_accumulation_agree(model_dir: Path, data_dir: Path) -> None:
    predictor = vglaw.Predictor.from_pretrained(model_dir)
    table = read_split_table(data_dir, "val").slice(0, 5)
    as_table = evaluate_rows(predictor, table)
    for other in (evaluate_rows(predictor, table.to_pydict()), evaluate_rows(predictor, table.to_pylist())):
        for name, values in as_table.items():
            assert list(other[name].ravel()) == list(values.ravel()), name
    metrics = accumulate(GroundingMetrics(), as_table)
    assert metrics.state_dict() == evaluate_batches(predictor, [table]).state_dict()
    computed = metrics.compute()
    # NOTE: other batch cuts change predictions in their last float bits (text padding, GEMM shapes), so only
    # approximately the same; evaluate_splits fixes its cuts to be exact.
    two_batches = evaluate_batches(predictor, [table.slice(0, 2), table.slice(2)]).compute()
    assert two_batches == pytest.approx(computed, abs=1e-5)
    ious = as_table["mask_intersection"] / as_table["mask_union"]
    assert computed["count"] == 5
    assert computed["miou"] == pytest.approx(ious.mean())
    assert computed["prec@0.5"] == pytest.approx((as_table["box_iou"] >= 0.5).mean())


def test_one_and_two_actors_give_identical_metrics(model_dir: Path, data_dir: Path) -> None:
    kwargs = {"batch_size": 4, "batches_per_chunk": 1}
    one = evaluate_splits(model_dir, data_dir, ["val", "testA"], num_actors=1, **kwargs)
    two = evaluate_splits(model_dir, data_dir, ["val", "testA"], num_actors=2, **kwargs)
    manifest = read_manifest(data_dir)
    for split in ("val", "testA"):
        assert one[split].count == two[split].count == manifest["splits"][split]["rows"]
        assert one[split].metrics.state_dict() == two[split].metrics.state_dict()
        assert one[split].metrics.compute() == two[split].metrics.compute()
        for name, values in one[split].results.items():
            a, b = np.asarray(values), np.asarray(two[split].results[name])
            assert a.tolist() == b.tolist() if a.dtype == object else np.array_equal(a, b, equal_nan=True), name


def test_report_contents(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "eval.json"
    config = EvaluationConfig(model=str(model_dir), data=data_dir, splits=("val", "testB"), out=out, overlays=3)
    outputs = run_evaluation(config, log=lambda _: None)
    report = json.loads(out.read_text())
    manifest = read_manifest(data_dir)
    assert report["report_version"] == 1
    assert report["model"]["preset"] == "tiny" and report["model"]["num_parameters"] > 0
    assert len(report["model"]["weights_sha256"]) == 64
    assert report["data"]["dataset"] == "synthetic" and report["data"]["image_size"] == 128
    assert list(report["splits"]) == ["val", "testB"]
    for split, section in report["splits"].items():
        assert section["count"] == manifest["splits"][split]["rows"]
        restored = GroundingMetrics.merged([section["metric_state"]]).compute()
        assert section["metrics"] == {k: v for k, v in restored.items() if "/len_" not in k}
        assert set(section["metrics"]) >= {"prec@0.5", "mean_box_iou", "miou", "oiou", "count"}
        assert list(section["by_length"]) == ["1-5", "6-7", "8-10", "11+"]
        assert sum(b["count"] for b in section["by_length"].values()) == section["count"]
    assert report["timing"]["total_s"] > 0 and report["settings"]["num_actors"] == 1
    assert outputs.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(outputs.overlay_paths) == {"val", "testB"}
    assert Image.open(outputs.overlay_paths["val"]).size[0] == 3 * 256


def test_overlay_grid_draws_boxes_and_masks() -> None:
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    mask = np.zeros((50, 100), bool)
    mask[10:20, 10:30] = True
    grid = np.asarray(
        overlay_grid(
            [image, image],
            [[5, 5, 40, 40], None],
            [[50, 10, 90, 45], None],
            [mask, None],
            [mask, None],
            captions=["a", "b"],
            columns=2,
            tile_size=100,
        )
    )
    assert grid.shape[1] == 200 and grid.shape[0] > 100
    tile = grid[:100, :100]
    assert (tile[..., 0] > 150).any() and (tile[..., 1] > 150).any()  # red prediction, green truth
    assert grid[:100, 100:200].max() < 40  # second tile: a black image with nothing drawn


def test_captions_wrap_at_spaces_and_mark_what_is_cut() -> None:
    def fits(line: str) -> bool:
        return len(line) <= 12

    text = 'hit (IoU 0.86): "the shape left of the circle"'
    assert wrap_caption(text, fits) == ["hit (IoU", '0.86): "the', "shape left~"]
    assert wrap_caption(text, fits, max_lines=9) == ["hit (IoU", '0.86): "the', "shape left", "of the", 'circle"']
    assert wrap_caption("a verylongwordindeed b", fits, max_lines=2) == ["a", "verylongwor~"]
    assert wrap_caption("", fits) == []
    assert wrap_caption("one two three four", fits, max_lines=1) == ["one two~"]  # no space before the mark


def test_overlay_grid_gives_long_captions_more_lines() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    short = np.asarray(overlay_grid([image], captions=["a"], tile_size=100))
    text = 'hit (IoU 0.86): "the shape to the left of the big red circle, below the small star"'
    long = np.asarray(overlay_grid([image], captions=[text], tile_size=100))
    line_h = short.shape[0] - 100 - 4  # one line of caption under the 100-px tile, 4 px of margin
    assert long.shape[0] - 100 - 4 == 3 * line_h  # three lines at most (the default)
    rows_with_text = np.flatnonzero((long[100:, :, 0] > 150).any(axis=1))
    assert rows_with_text.max() >= 2 * line_h  # the third line is drawn, not just reserved
    assert np.asarray(overlay_grid([image], captions=[""], tile_size=100)).shape == short.shape  # one line kept


def test_overlay_examples_from_rows(model_dir: Path, data_dir: Path) -> None:
    predictor = vglaw.Predictor.from_pretrained(model_dir)
    rows = read_split_table(data_dir, "val").slice(0, 3).to_pylist()
    grid = overlay_examples(predictor, rows, max_items=2, columns=2)
    assert grid.size[0] == 2 * 256 and grid.mode == "RGB"


def test_cli_end_to_end(model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from jobs.evaluate import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = tmp_path / "r" / "report.json"
    argv = ["--model", str(model_dir), "--data", str(data_dir), "--splits", "val,testA", "--actors", "2"]
    assert main([*argv, "--batch-size", "4", "--out", str(out), "--overlays", "2", "--run-name", "cli-test"]) == 0
    report = json.loads(out.read_text())
    assert set(report["splits"]) == {"val", "testA"}
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("evaluation")
    assert experiment.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "cli-test"
    assert run.data.metrics["val/prec_at_0.5"] == report["splits"]["val"]["metrics"]["prec@0.5"]
    assert run.data.metrics["testA/miou"] == report["splits"]["testA"]["metrics"]["miou"]
    assert "val/len_1-5/count" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report_by_length.png", "report_overlays_val.png"} <= names

    assert main(["--model", str(tmp_path / "nope"), "--data", str(data_dir), "--no-mlflow"]) == 1
    assert main(["--model", str(model_dir), "--data", str(data_dir), "--actors", "0"]) == 2


def test_reports_go_under_runs_by_default_named_after_the_model() -> None:
    expected = {
        "runs/vglaw-synthetic/model": "vglaw-synthetic",
        "/models/my model": "my-model",
        "models:/vglaw-synthetic@best": "vglaw-synthetic@best",
        "models:/vglaw-synthetic/3": "vglaw-synthetic-v3",
        "runs:/0a1b2c/model": "0a1b2c-model",
    }
    for model, label in expected.items():
        config = EvaluationConfig(model=model, data=Path("data"))
        assert config.out == Path("runs", "evaluation", label, "report.json"), model
        assert config.artifact_path("by_length.png") == Path("runs", "evaluation", label, "report_by_length.png")
    assert EvaluationConfig(model="m", data=Path("d"), out="x/r.json").out == Path("x/r.json")


def test_cli_help_documents_every_flag() -> None:
    text = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--model", "--data", "--splits", "--actors", "--batch-size", "--out", "--no-mlflow", "--run-id"):
        assert flag in text
