"""The MLflow UI of a finished run in a real browser: start ``mlflow server`` on a store, open the run's pages in
headless Chromium (Selenium) and find its metrics and its step-indexed images (``MlflowClient.log_image(...,
key=..., step=...)``).

What the UI of MLflow 3.17 shows (found by exploring it with a driver):

- ``#/experiments/<id>`` opens the GenAI overview (trace charts) in a new browser, whatever the experiment's
  ``mlflow.experimentKind``, unless the link carries ``?workflowType=machine_learning``: then the runs table.
- ``#/experiments/<id>/runs/<run_id>`` (the run's Overview tab) has a "Metrics (N)" table whose metric names are
  links to ``#/experiments/<id>/runs/<run_id>/model-metrics``.
- The "Model metrics" tab (``.../model-metrics``) has one chart card per metric and one "image grid" card per
  image key (``[data-testid=experiment-view-compare-runs-card]`` holding ``h4[title=<key>]``); an image key without
  a ``/`` lands in the "Model metrics" section at the bottom. Cards are drawn only once scrolled into view. The image
  card starts at step 0 ("No image logged at this step") and has a step slider (``[role=slider]``, min and max = the
  logged steps) and a step box (``input[type=number]``); its images are
  ``get-artifact?path=images/<key>+step+<n>+...&run_uuid=<run_id>``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pipelines.tracking.runs import UI_WORKFLOW

CARD = "[data-testid=experiment-view-compare-runs-card]"
SERVER_START_TIMEOUT = 300.0  # the server imports for a long time on a busy machine (90 s seen on 2 cores)
_CARD_IMAGES_JS = """
return Array.from(arguments[0].querySelectorAll('img'))
  .filter((e) => e.complete && e.naturalWidth > 0)
  .map((e) => e.getAttribute('src'));
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_server(backend_store_uri: str, workdir: Path, timeout: float = SERVER_START_TIMEOUT) -> Iterator[str]:
    """Runs ``mlflow server`` (one worker, 127.0.0.1, a free port) on ``backend_store_uri``; yields its base URL.

    The runs' artifacts are read where their runs say (``file://`` locations are read by the server itself), so
    artifact proxying is off; experiments created through this server would keep artifacts under ``workdir``.
    The server's output goes to ``workdir/mlflow-server.log``, whose tail is printed when anything fails.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = workdir / "mlflow-server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", backend_store_uri,
        "--no-serve-artifacts",
        "--default-artifact-root", (workdir / "mlartifacts").resolve().as_uri(),
    ]  # fmt: skip
    # No job runner (its huey consumers would cost several processes), no telemetry.
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while not _answers(f"{base}/health"):
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not answer {base}/health within {timeout:.0f} s")
            time.sleep(1)
        yield base
    except BaseException:
        tail = log_path.read_text(errors="replace")[-4000:]
        print(f"--- mlflow server log ({log_path}), tail ---\n{tail}", file=sys.stderr)
        raise
    finally:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            except ProcessLookupError:
                pass


def _wait(driver, condition: Callable[[Any], Any], timeout: float, message: str | Callable[[], str]) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=1).until(condition)
    except TimeoutException:
        text = message() if callable(message) else message
        raise AssertionError(f"{text} (waited {timeout:.0f} s at {driver.current_url})") from None


def check_experiment_page(driver, url: str, run_name: str, timeout: float = 120) -> None:
    """Opens ``url`` (:func:`pipelines.tracking.runs.experiment_page`) and waits for the model-training view: its
    runs table ("Run Name" header) listing ``run_name``. The GenAI view shows trace charts and no runs table."""
    from selenium.webdriver.common.by import By

    driver.get(url)

    def body() -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    _wait(
        driver,
        lambda d: "Run Name" in body().splitlines() and run_name in body().splitlines(),
        timeout,
        lambda: f"no runs table with {run_name!r}: {body()[:600]!r}",
    )


def shown_metric_keys(driver, run_id: str) -> set[str]:
    """The metric names in the run Overview's "Metrics" table (links to the run's model-metrics tab)."""
    from selenium.webdriver.common.by import By

    links = driver.find_elements(By.CSS_SELECTOR, f'a[href$="/runs/{run_id}/model-metrics"]')
    return {link.text.strip() for link in links}


def image_card(driver, image_key: str):
    """The "Model metrics" tab's image-grid card of ``image_key``, or None (scrolls cards into view to draw them)."""
    from selenium.webdriver.common.by import By

    titles = driver.find_elements(By.CSS_SELECTOR, f'{CARD} h4[title="{image_key}"]')
    if titles:
        return titles[0].find_element(By.XPATH, "./ancestor::*[@data-testid='experiment-view-compare-runs-card']")
    cards = driver.find_elements(By.CSS_SELECTOR, CARD)
    if cards:  # cards (and sections) below the fold are drawn once scrolled to
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cards[-1])
    return None


def shown_image_steps(card, image_key: str) -> set[int]:
    """The steps of ``image_key`` whose images the card shows, loaded (read from the images' artifact paths)."""
    steps = set()
    for src in card.parent.execute_script(_CARD_IMAGES_JS, card):
        path = unquote(src or "")
        marker = f"images/{image_key}+step+"
        if marker in path:
            steps.add(int(path.split(marker, 1)[1].split("+", 1)[0]))
    return steps


def _wait_for_step(driver, card, image_key: str, step: int, timeout: float) -> None:
    _wait(
        driver,
        lambda _: step in shown_image_steps(card, image_key),
        timeout,
        f"the {image_key!r} card shows no loaded image of step {step}",
    )


def check_run_page(
    driver,
    base_url: str,
    experiment_id: str,
    run_id: str,
    metric_keys: list[str],
    image_key: str,
    screenshot: Path,
    timeout: float = 90.0,
) -> None:
    """Opens the run in the MLflow UI at ``base_url`` and asserts that it shows each of ``metric_keys`` and the
    images logged under ``image_key`` at their first and last steps; saves a screenshot of the model-metrics tab
    (metric charts and the image card, at its last step) to ``screenshot``.

    Two page loads: the run's Overview (metrics table), then its Model metrics tab (image card).
    """
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run_url = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    view = f"?workflowType={UI_WORKFLOW}"  # the model-training view's sidebar, as the project's links open it
    driver.get(run_url + view)
    wanted = set(metric_keys)
    _wait(
        driver,
        lambda d: wanted <= shown_metric_keys(d, run_id),
        timeout,
        lambda: f"the run's Metrics table does not show {sorted(wanted - shown_metric_keys(driver, run_id))}",
    )

    driver.get(f"{run_url}/model-metrics{view}")
    card = _wait(driver, lambda d: image_card(d, image_key), timeout, f"no image card titled {image_key!r}")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
    # The step slider starts at step 0, below its min: its keys and a click at its min do nothing then. The step
    # box's arrow-up moves it to its min, a click at the slider track's right end to its max.
    slider = card.find_element(By.CSS_SELECTOR, "[role=slider]")
    first, last = int(slider.get_attribute("aria-valuemin")), int(slider.get_attribute("aria-valuemax"))
    if int(slider.get_attribute("aria-valuenow") or 0) != first:
        card.find_element(By.CSS_SELECTOR, "input[type=number]").send_keys(Keys.ARROW_UP)
    _wait_for_step(driver, card, image_key, first, timeout)
    if last != first:
        track = slider.find_element(By.XPATH, "./ancestor::*[@data-orientation][last()]")
        ActionChains(driver).move_to_element_with_offset(track, track.size["width"] // 2 - 1, 0).click().perform()
        _wait_for_step(driver, card, image_key, last, timeout)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(screenshot)), f"could not save {screenshot}"
