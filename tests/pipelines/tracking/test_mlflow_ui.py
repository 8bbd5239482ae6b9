"""The MLflow UI (``mlflow server``) in a real browser shows a finished run's metrics and step-indexed images."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.tracking.runs import experiment_page
from tests.browser_harness import headless_chromium
from tests.pipelines.tracking.mlflow_ui import (
    check_experiment_page,
    check_run_page,
    image_card,
    mlflow_server,
    shown_image_steps,
    shown_metric_keys,
)

pytestmark = pytest.mark.slow

METRIC_KEYS = ["train/loss", "val/prec_at_0.5", "val/miou"]
IMAGE_KEY = "val_overlays"
EPOCHS = (1, 2, 3)


def _build_store(root: Path) -> tuple[str, str, str]:
    """A SQLite store with one finished run like a training run's: metrics and overlay images per epoch.

    Returns (store URI, experiment id, run id)."""
    from mlflow.tracking import MlflowClient
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = client.create_experiment(
        "ui-check",
        artifact_location=(root / "mlartifacts" / "ui-check").as_uri(),
        tags={"mlflow.experimentKind": "custom_model_development"},
    )
    run_id = client.create_run(experiment_id, run_name="ui-run").info.run_id
    for step in range(1, 21):
        client.log_metric(run_id, "train/loss", 2.0 / step, step=step)
    for step in (0, 10, 20):
        client.log_metric(run_id, "val/prec_at_0.5", 0.3 + step / 40, step=step)
        client.log_metric(run_id, "val/miou", 0.2 + step / 50, step=step)
    for epoch in EPOCHS:
        image = Image.new("RGB", (96, 64), (40, 40, 40))
        draw = ImageDraw.Draw(image)
        draw.rectangle([10 * epoch, 10, 10 * epoch + 40, 50], outline=(255, 45, 85), width=3)
        draw.ellipse([50, 15, 85, 50], fill=(0, 190, 255))
        client.log_image(run_id, image, key=IMAGE_KEY, step=epoch)
    client.set_terminated(run_id, "FINISHED")
    return uri, experiment_id, run_id


def test_mlflow_ui_shows_metrics_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    started = time.monotonic()
    uri, experiment_id, run_id = _build_store(tmp_path / "store")
    driver = headless_chromium(tmp_path / "chromium-profile", window=(1400, 1400))
    try:
        with mlflow_server(uri, tmp_path / "server") as base_url:
            screenshot = tmp_path / "mlflow_run.png"
            check_run_page(driver, base_url, experiment_id, run_id, METRIC_KEYS, IMAGE_KEY, screenshot)

            # The helpers can tell what is not there: the card is at its last step only, and no other key's images.
            card = image_card(driver, IMAGE_KEY)
            assert card is not None and shown_image_steps(card, IMAGE_KEY) == {EPOCHS[-1]}
            assert shown_image_steps(card, "val_other") == set()
            assert image_card(driver, "no_such_images") is None
            driver.back()  # to the Overview tab (a route change in the page, no reload)
            WebDriverWait(driver, 60, poll_frequency=1).until(
                lambda d: set(METRIC_KEYS) <= shown_metric_keys(d, run_id)
            )
            shown = shown_metric_keys(driver, run_id)
            assert "val/no_such_metric" not in shown and "train/loss" in shown
            # The experiment's link opens its runs, in the model-training view.
            check_experiment_page(driver, experiment_page(base_url, experiment_id), "ui-run")
    finally:
        driver.quit()
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000, screenshot.stat().st_size
    print(f"MLflow UI check took {time.monotonic() - started:.0f} s; screenshot {screenshot}")
