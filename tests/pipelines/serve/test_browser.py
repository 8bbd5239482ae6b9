"""The web page in a real browser (headless Chromium through Selenium): choose an image, type an expression and
the token, and the box and mask are drawn over the image."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser_harness import headless_chromium
from tests.pipelines.serve_harness import running_app, save_tiny_model, shapes_image

pytestmark = pytest.mark.slow

TOKEN = "browser-token-42"
REPO = Path(__file__).resolve().parents[3]
# The screenshot is also kept here (an ignored folder), to look at after the run.
SCREENSHOT_COPY = REPO / "runs" / "test-artifacts" / "serve_page.png"
# Pixels of the box's stroke (rgb(255, 45, 85)) and of the mask's tint (rgb(0, 190, 255) at 45% over grey).
COUNT_OVERLAY_JS = """
const canvas = document.getElementById("view");
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let box = 0, mask = 0;
for (let i = 0; i < data.length; i += 4) {
  const r = data[i], g = data[i + 1], b = data[i + 2];
  if (r > 230 && g < 80 && b > 60 && b < 120) box++;
  if (b > r + 60 && g > r + 30) mask++;
}
return [box, mask, canvas.width, canvas.height];
"""
DROP_FILE_JS = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
"""


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model_dir = save_tiny_model(tmp_path_factory.mktemp("browser") / "model")
    with running_app({"model": str(model_dir), "auth_token": TOKEN}) as base:
        yield base


@pytest.fixture
def browser(tmp_path: Path):
    driver = headless_chromium(tmp_path / "chromium-profile", window=(1100, 1200))
    yield driver
    driver.quit()


def _wait_for_state(driver, states: tuple[str, ...], stale: str | None = None, timeout: float = 60) -> str:
    """Waits until the page's status is one of ``states`` (with a text other than ``stale``); returns the text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, timeout).until(
        lambda _: status.get_attribute("data-state") in states and status.text != stale
    )
    return status.text


def test_page_draws_box_and_mask(browser, url: str, tmp_path: Path) -> None:
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = tmp_path / "shapes.png"
    shapes_image(320, 240, seed=5).save(image_path)
    browser.get(f"{url}/")
    model = browser.find_element(By.ID, "model")
    WebDriverWait(browser, 30).until(lambda _: "sha256:" in model.text)

    browser.find_element(By.ID, "file").send_keys(str(image_path))
    assert "320x240" in _wait_for_state(browser, ("ready",))
    browser.find_element(By.ID, "expression").send_keys("the blue circle")
    browser.find_element(By.ID, "submit").click()
    unauthorized = _wait_for_state(browser, ("error",))
    assert "401 unauthorized" in unauthorized

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "submit").click()
    assert _wait_for_state(browser, ("done", "error"), stale=unauthorized) == "done"
    box_pixels, mask_pixels, width, height = browser.execute_script(COUNT_OVERLAY_JS)
    assert (width, height) == (320, 240), "the canvas holds the image at its own size"
    assert box_pixels > 50 and mask_pixels > 0, (box_pixels, mask_pixels)
    details = browser.find_element(By.ID, "details").text
    assert "box [x0, y0, x1, y1]" in details and "image 320x240" in details and "batch of" in details

    screenshot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)

    # Dropping a file onto the page replaces the image.
    dropped = tmp_path / "dropped.png"
    shapes_image(200, 300, seed=6).save(dropped)
    browser.execute_script(DROP_FILE_JS, base64.b64encode(dropped.read_bytes()).decode())
    assert "dropped.png (200x300)" in _wait_for_state(browser, ("ready",))
    browser.find_element(By.ID, "submit").click()
    assert _wait_for_state(browser, ("done", "error")) == "done"
