"""The explorer page in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Starts ``tools/explore.py`` on a free local port as a user would, uploads a photo, clicks a patch of
the hard map and checks that the attention view changes.  The screenshot goes to
``$EXPLORER_SCREENSHOT`` when set (the README's picture: ``tools/examples/explorer.jpg``).
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from .conftest import REPO, SKLEARN_IMAGES

CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it
STARTUP_S = 180


@pytest.fixture
def explorer_url(tmp_path):
    """The URL of ``tools/explore.py --port 0`` (a free port), stopped after the test."""
    log = tmp_path / "explore.log"
    with log.open("w") as output:
        server = subprocess.Popen([sys.executable, str(REPO / "tools" / "explore.py"), "--port", "0", "--device", "cpu"],
                                  cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_S
        url = None
        while url is None and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
            url = re.search(r"http://127\.0\.0\.1:\d+/?", log.read_text())
        assert url, f"explore.py printed no URL; its output:\n{log.read_text()}"
        yield url.group(0)
    finally:
        server.terminate()
        server.wait(timeout=30)


def image_source(page, element_id: str) -> str:
    return page.locator(f"#{element_id} img").first.get_attribute("src") or ""


@pytest.mark.slow
def test_upload_click_and_screenshot(explorer_url, tmp_path):
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    photo = tmp_path / "flower.jpg"
    shutil.copy(SKLEARN_IMAGES / "flower.jpg", photo)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(explorer_url)

        # a file that is not an image: a message in the page, and the page keeps working
        page.locator("#upload input[type=file]").set_input_files(str(not_an_image))
        expect(page.locator("#status")).to_contain_text("notes.jpg is not an image", timeout=60_000)

        page.locator("#upload button[aria-label*='Clear'], #upload button[title*='Clear']").first.click()
        page.locator("#upload input[type=file]").set_input_files(str(photo))
        expect(page.locator("#status")).to_contain_text("flower.jpg · pacavit_tiny_p2cconv_100_0, random weights "
                                                        "(seed 0)", timeout=120_000)
        expect(page.locator("#hard img").first).to_be_visible()
        expect(page.locator("#attention-line")).to_contain_text("stage 3, block 0, patch (row 7, col 7) of 14x14")
        before = image_source(page, "attention")

        hard = page.locator("#hard img").first
        box = hard.bounding_box()
        hard.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.32})  # on the flower
        expect(page.locator("#attention-line")).to_contain_text("patch (row 4, col 4) of 14x14", timeout=30_000)
        expect(page.locator("#attention img").first).not_to_have_attribute("src", before)
        assert "Error" not in page.locator("#status").inner_text()

        screenshot = Path(os.environ.get("EXPLORER_SCREENSHOT", tmp_path / "explorer.jpg"))
        page.screenshot(path=str(screenshot), full_page=True, type="jpeg", quality=80)
        browser.close()
    assert screenshot.stat().st_size > 30_000
