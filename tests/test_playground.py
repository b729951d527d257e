"""The browser playground in a real browser: Debian's chromium driven by Playwright against
`da3-serverless serve` with a random-weight da3-small.

Needs a Chromium: Debian's (`apt-get install -y chromium`, which the Makefile runs) or the
Chrome/Chromium a CI image already has. Without one the test skips locally and fails under
CI=true. Never `playwright install`: it downloads browsers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import TEST_API_KEY
from paths import IMAGES, REPO
from servers import serve_process

CHROMIUM = next(
    (Path(found) for name in ("chromium", "chromium-browser", "google-chrome")
     if (found := shutil.which(name))),
    None,
)  # fmt: skip
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # WebGL on the CPU (SwiftShader), since there is no GPU.
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
]  # fmt: skip
ARTIFACTS = REPO / "artifacts"  # git-ignored; CI can upload it

# Fraction of the point-cloud canvas that is not the background colour.
PAINTED_FRACTION_JS = """() => {
  const source = document.querySelector('#cloud canvas');
  const canvas = document.createElement('canvas');
  canvas.width = source.width; canvas.height = source.height;
  const context = canvas.getContext('2d');
  context.drawImage(source, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    if (pixels[i] + pixels[i + 1] + pixels[i + 2] > 60) painted++;
  }
  return painted / (pixels.length / 4);
}"""


@pytest.fixture(scope="module")
def server(hf_cache, tmp_path_factory):
    import conftest

    env = conftest.service_env.__wrapped__(hf_cache, tmp_path_factory.mktemp("playground"))
    del env["MODEL_ID"]  # the model comes from --model (a short name) instead
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(env, log, "--model", "da3-small") as (url, _):
        yield url


@pytest.mark.slow
def test_playground_end_to_end(server, tmp_path):
    if CHROMIUM is None:
        message = "no chromium on PATH: apt-get install -y chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    page_source = httpx.get(f"{server}/").text + httpx.get(f"{server}/static/app.js").text
    assert TEST_API_KEY not in page_source
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server)
            page.wait_for_selector(
                "#model option[value='depth-anything/DA3-SMALL']", state="attached"
            )
            assert page.input_value("#model") == "depth-anything/DA3-SMALL"  # the default
            assert "Apache-2.0" in page.text_content("#license")
            page.fill("#api-key", TEST_API_KEY)
            page.fill("#process-res", "140")
            page.set_input_files("#file", str(IMAGES / "soh-000.png"))
            page.wait_for_function("document.getElementById('input').naturalWidth > 0")
            page.click("#run")
            page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=300_000)
            assert page.get_attribute("body", "data-state") == "done", page.text_content("#status")
            page.wait_for_function("document.getElementById('depth').naturalWidth === 1208")
            assert int(page.get_attribute("#cloud", "data-points")) > 50_000
            page.wait_for_function(f"({PAINTED_FRACTION_JS})() > 0.05", timeout=60_000)

            box = page.locator("#depth").bounding_box()
            readouts = []
            for fx, fy in ((0.1, 0.1), (0.5, 0.6), (0.9, 0.9)):
                page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
                readouts.append(page.text_content("#readout"))
            assert len(set(readouts)) == 3 and all("rel." in r for r in readouts), readouts

            cloud = page.locator("#cloud canvas").bounding_box()
            before = page.locator("#cloud canvas").screenshot()
            page.mouse.move(cloud["x"] + 200, cloud["y"] + 200)
            page.mouse.down()
            page.mouse.move(cloud["x"] + 400, cloud["y"] + 250, steps=10)
            page.mouse.up()
            page.wait_for_timeout(300)  # let the animation loop draw the rotated view
            assert page.locator("#cloud canvas").screenshot() != before  # it rotates

            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "playground.png")

            page.goto(f"{server}/docs")  # Swagger UI from the vendored files
            page.wait_for_selector("[data-path='/runsync']", state="attached", timeout=60_000)
        finally:
            browser.close()
    assert errors == []
