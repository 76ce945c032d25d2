"""The page in a real browser: headless Chromium, driven by Selenium through Debian's chromedriver.

Needs ``apt-get install chromium chromium-driver`` and ``pip install selenium``; nothing is downloaded.
Leaves a screenshot in ``test-artifacts/browser.png``.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from tests.helpers import live_server  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _find(names: tuple[str, ...], paths: tuple[str, ...]) -> str | None:
    for p in paths:
        if Path(p).is_file():
            return p
    for n in names:
        if found := shutil.which(n):
            return found
    return None


CHROMIUM = _find(("chromium", "chromium-browser"), ("/usr/bin/chromium", "/usr/bin/chromium-browser"))
CHROMEDRIVER = _find(("chromedriver",), ("/usr/bin/chromedriver",))

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,1100", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def scene(path: Path, size: int = 256) -> Path:
    """A light image with a red square and a blue disc, like the shapes data."""
    yy, xx = np.mgrid[:size, :size]
    a = np.full((size, size, 3), 238, dtype=np.uint8)
    a[size // 8: size // 8 + size // 3, size // 8: size // 8 + size // 3] = (220, 40, 40)
    a[(yy - 0.68 * size) ** 2 + (xx - 0.66 * size) ** 2 < (size / 6) ** 2] = (40, 80, 220)
    Image.fromarray(a).save(path)
    return path


def test_upload_caption_and_attention_heatmap(tiny_checkpoint, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from captioner.serve import create_app

    image = scene(tmp_path / "scene.png")
    app = create_app(tiny_checkpoint)
    wait = WebDriverWait(browser, 30)
    with live_server(app) as port:
        url = f"http://127.0.0.1:{port}/"
        browser.get(url)
        wait.until(lambda d: "soft attention" in d.find_element(By.ID, "model-info").text)
        # Greedy decoding: a barely trained model's beam search may settle on an empty caption.
        browser.execute_script(
            "const b = document.getElementById('beam'); b.value = '1';"
            "b.dispatchEvent(new Event('input'));")
        assert browser.find_element(By.ID, "beam-out").text == "1"
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        status = browser.find_element(By.ID, "status")
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", status.text
        words = browser.find_elements(By.CSS_SELECTOR, "#caption .word")
        assert words, "no caption words shown"
        thumbs = browser.find_elements(By.CSS_SELECTOR, "#strip .thumb")
        assert len(thumbs) == len(words), "one thumbnail per word"

        overlay = browser.find_element(By.ID, "overlay")
        assert "visible" not in overlay.get_attribute("class")
        target = words[min(1, len(words) - 1)]
        target.click()
        wait.until(lambda d: "visible" in overlay.get_attribute("class"))
        assert overlay.get_attribute("data-word") == target.text
        assert "pinned" in target.get_attribute("class")
        wait.until(lambda d: float(overlay.value_of_css_property("opacity")) > 0.99)
        opaque, total = browser.execute_script(
            "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return [n, d.length / 4];",
            overlay,
        )
        assert total > 0 and opaque > 0.5 * total, (opaque, total)
        thumb_opaque = browser.execute_script(
            "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 0) n++; return n;",
            thumbs[0].find_element(By.TAG_NAME, "canvas"),
        )
        assert thumb_opaque > 0

        # Keyboard: the next word becomes the pinned one.
        browser.find_element(By.TAG_NAME, "body").send_keys("\ue014")  # ArrowRight
        expected = words[(min(1, len(words) - 1) + 1) % len(words)].text
        wait.until(lambda d: overlay.get_attribute("data-word") == expected)

        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "browser.png"))
        png = Image.open(io.BytesIO(browser.get_screenshot_as_png()))
        assert png.size[0] >= 800

        severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe  # no failed requests, no script errors, no blocked external loads


def test_bad_upload_shows_an_error(tiny_checkpoint, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from captioner.serve import create_app

    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is text, not a picture\n" * 20)
    with live_server(create_app(tiny_checkpoint)) as port:
        url = f"http://127.0.0.1:{port}/"
        browser.get(url)
        browser.find_element(By.ID, "file").send_keys(str(bogus))
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
        status = browser.find_element(By.ID, "status")
        assert status.is_displayed()
        assert "not an image" in status.text and "415" in status.text
