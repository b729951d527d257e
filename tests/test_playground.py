"""The browser playground in a real browser: Debian's chromium driven by Playwright against
`da3-serverless serve` with a random-weight da3-small.

Three photos go in as views of one scene (the two test photos and a crop of one, as JPEG); the
page must load the returned scene GLB with three.js (points and one frustum per view), show
each view's depth under the cursor and its colour legend, overlay the confidence, and offer
every returned output as a download whose bytes are exactly what the API returns for the same
request. Also: the models marked as /models reports them, the key kept over a reload, a
cancelled request, and errors and warnings as a browser user should read them.

A tiny synthetic video goes in as a sequence job (/run, /status polled): the page shows each
chunk's progress, then plays the preview_video and draws the trajectory's camera centres. A zip
of frames goes the same way, as frames_zip_base64.

Needs a Chromium: Debian's (`apt-get install -y chromium`, which the Makefile runs) or the
Chrome/Chromium a CI image already has. Without one the test skips locally and fails under
CI=true. Never `playwright install`: it downloads browsers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TEST_API_KEY
from da3_serverless.client import SCENE_FILES, SequenceResult, parse_response
from paths import IMAGES, REPO
from servers import serve_process
from videos import constant_rate, make_video

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
# The optional downloads the test asks for (every file format the page can offer).
EXTRAS = ("depth_npy", "depth_exr", "confidence_npy", "pointcloud", "scene_ply", "colmap")
READOUT = re.compile(r"view (\d+) \((\d+), (\d+)\) (-?[\d.]+) rel\.")

# Fraction of the scene canvas that is not the background colour.
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
HINT_JS = "(id) => getComputedStyle(document.getElementById(id), '::before').content"


@pytest.fixture(scope="module")
def server(hf_cache, tmp_path_factory):
    import conftest

    env = conftest.service_env.__wrapped__(hf_cache, tmp_path_factory.mktemp("playground"))
    del env["MODEL_ID"]  # the model comes from --model (a short name) instead
    # Room for every output of the test's request inline but the views' point clouds (about
    # 60.0 MB of JSON before them, the smallest cloud 7.7 MB more): every file format is a
    # download button, and the point clouds show how a stored output is shown.
    env["MAX_RESPONSE_BYTES"] = "65000000"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(env, log, "--model", "da3-small") as (url, _):
        yield url


def three_photos(folder: Path) -> list[Path]:
    """The two test photos and a third view made from the second: a crop, saved as JPEG (so
    the views have different sizes and formats)."""
    crop = folder / "soh-010-crop.jpg"
    with Image.open(IMAGES / "soh-010.png") as image:
        image.convert("RGB").crop((200, 100, 1000, 580)).save(crop, quality=92)
    return [IMAGES / "soh-000.png", IMAGES / "soh-010.png", crop]


def chromium_or_skip() -> Path:
    if CHROMIUM is None:
        message = "no chromium on PATH: apt-get install -y chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@contextlib.contextmanager
def playground_page(server: str) -> Iterator:
    """A fresh 1280 x 1400 page in Debian's chromium (through Playwright; the test is skipped
    without it); any script error the page raises fails the test once the block ends."""
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
        finally:
            browser.close()
    assert errors == []


def keep_screenshot(page, tmp_path: Path, name: str) -> None:
    """The whole page as `name`, kept in ARTIFACTS for a person to look at."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)


@pytest.mark.slow
def test_playground_end_to_end(server, tmp_path):
    html, script = (httpx.get(f"{server}{path}").text for path in ("/", "/static/app.js"))
    assert TEST_API_KEY not in html + script
    # Nothing from a CDN: the page and its modules load from this server only.
    assert not re.search(r'(src|href)="(?!/|data:)', html)
    assert set(re.findall(r'from "([^"]+)"', script)) <= {
        "three", "three/addons/controls/OrbitControls.js", "three/addons/loaders/GLTFLoader.js"
    }  # fmt: skip
    photos = three_photos(tmp_path)
    with playground_page(server) as page:
        page.goto(server)
        check_empty_page(page)
        check_key_kept(page)
        fill_form(page, photos)
        check_cancel(page)
        page.click("#run")
        page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=300_000)
        assert page.get_attribute("body", "data-state") == "done", page.text_content("#status")
        check_no_server_advice(page.text_content("#status"))
        request, shown = page.evaluate("[__playground.request, __playground.response]")
        direct = api_response(server, request)
        check_scene(page, shown)
        check_depth_views(page, direct)
        check_downloads(page, shown, direct, tmp_path)
        check_orbit(page)
        check_readable_error(page)

        keep_screenshot(page, tmp_path, "playground.png")

        page.goto(f"{server}/docs")  # Swagger UI from the vendored files
        page.wait_for_selector("[data-path='/runsync']", state="attached", timeout=60_000)


def check_empty_page(page) -> None:
    """Before any photo: the model table is loaded, each model marked as /models says (only
    da3-small is on disk, and the server is offline), and every empty box shows its hint, not
    a broken image."""
    page.wait_for_selector("#model option[value='depth-anything/DA3-SMALL']", state="attached")
    assert page.input_value("#model") == "depth-anything/DA3-SMALL"  # the default
    marks = page.eval_on_selector_all(
        "#model option", "options => options.map(o => [o.value, o.dataset.availability, o.text])"
    )
    assert {value: mark for value, mark, _ in marks}["depth-anything/DA3-SMALL"] == "available"
    others = [(mark, text) for value, mark, text in marks if value != "depth-anything/DA3-SMALL"]
    assert others and all(mark == "unavailable" and text.endswith("(not on this server)")
                          for mark, text in others)  # fmt: skip
    assert "DA3_API_KEY" not in page.get_attribute("#api-key", "placeholder")
    assert "Apache-2.0" in page.text_content("#license")
    for frame in ("input-frame", "depth-frame", "cloud", "views", "downloads"):
        assert page.evaluate(HINT_JS, frame) not in ("none", "normal", '""'), frame
    assert not page.locator("#input").is_visible() and not page.locator("#depth").is_visible()
    # da3-small gives relative depth and no sky: no millimetres, no sky overlay; it has no
    # 3D-Gaussian head, which DA3-GIANT-1.1 has (by /models).
    assert page.locator("#extras input[value=depth_mm_png]").is_disabled()
    assert page.locator("input[name=overlay][value=sky_mask]").is_disabled()
    gaussians = page.locator("#extras input[value=gaussians_ply]")
    assert gaussians.is_disabled()
    assert "3D-Gaussian head" in page.get_attribute("#extras label:has(input[value=gaussians_ply])",
                                                    "title")  # fmt: skip
    page.select_option("#model", "depth-anything/DA3-GIANT-1.1")
    assert gaussians.is_enabled()
    page.select_option("#model", "depth-anything/DA3-SMALL")
    assert gaussians.is_disabled()


def check_key_kept(page) -> None:
    """The key survives a reload (this tab's sessionStorage), and a new session starts without."""
    page.fill("#api-key", TEST_API_KEY)
    page.reload()
    page.wait_for_selector("#model option[value='depth-anything/DA3-SMALL']", state="attached")
    assert page.input_value("#api-key") == TEST_API_KEY
    other = page.context.browser.new_page()
    other.goto(page.url)
    assert other.input_value("#api-key") == ""
    other.close()


def check_cancel(page) -> None:
    """Cancel while the request is in flight (held by the test, so it cannot finish first):
    the page says so, as no error, and can run again."""
    page.route("**/runsync", lambda route: None)  # never answered
    page.click("#run")
    page.wait_for_selector("#cancel:not([hidden])")
    page.click("#cancel")
    page.wait_for_selector("body[data-state=cancelled]")
    assert page.text_content("#status") == "Cancelled."
    assert page.locator("#cancel").is_hidden() and page.locator("#run").is_enabled()
    page.unroute("**/runsync")


def check_no_server_advice(status: str) -> None:
    """The views' point clouds were stored (past the response limit): the status says so
    without telling a browser user to change server settings."""
    assert "pointcloud" in status and "response size limit" in status
    assert not re.search(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", status), status


def check_readable_error(page) -> None:
    """A model that is not on the server: one readable sentence, no server paths."""
    page.select_option("#model", "depth-anything/DA3-BASE")
    page.click("#run")
    page.wait_for_selector("body[data-state=error]", timeout=120_000)
    status = page.text_content("#status")
    assert "DA3-BASE is not available on this server" in status and status.endswith(".")
    assert "/tmp" not in status and "\n" not in status and "model_unavailable" not in status
    assert page.locator("#status.error").is_visible()


def fill_form(page, photos: list[Path]) -> None:
    page.fill("#api-key", TEST_API_KEY)
    page.fill("#process-res", "140")
    page.fill("#max-points", "30000")
    for name in EXTRAS:
        page.check(f"#extras input[value={name}]")
    page.set_input_files("#file", [str(photo) for photo in photos])
    page.wait_for_selector("#views button[data-view='2']")
    page.wait_for_function("document.getElementById('input').naturalWidth === 1208")
    assert page.evaluate(HINT_JS, "views") in ("none", "normal")  # filled: no hint any more


def api_response(server: str, request: dict) -> dict:
    """The same request, sent straight to the API."""
    response = httpx.post(
        f"{server}/runsync", json=request, headers={"X-API-Key": TEST_API_KEY}, timeout=300
    )
    assert response.status_code == 200, response.text
    return response.json()


def check_scene(page, response: dict) -> None:
    """three.js loaded the GLB: one point cloud with every scene point, one frustum per view."""
    scene = page.evaluate("__playground.scene")
    assert scene["objects"] == 4, scene
    assert scene["cameras"] == ["camera_000", "camera_001", "camera_002"]
    assert scene["points"] == response["scene"]["points"] > 1000
    assert page.get_attribute("#cloud", "data-cameras") == "3"
    page.wait_for_function(f"({PAINTED_FRACTION_JS})() > 0.05", timeout=60_000)


def check_depth_views(page, direct: dict) -> None:
    """Each view's depth under the cursor is the API's (within the 16-bit PNG's step), in the
    response's units; the confidence overlay is the API's confidence PNG."""
    result = parse_response(direct)
    for index, view in enumerate(result.views):
        page.click(f"#views button[data-view='{index}']")
        page.wait_for_function(
            f"document.getElementById('depth').naturalWidth === {view.width}"
        )  # fmt: skip
        box = page.locator("#depth").bounding_box()
        readouts: list[str] = []
        for fx, fy in ((0.1, 0.1), (0.5, 0.6), (0.9, 0.9)):
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
            page.wait_for_function(
                "([prefix, previous]) => { const text = document.getElementById('readout')"
                ".textContent; return text.startsWith(prefix) && text !== previous; }",
                arg=[f"view {index} (", readouts[-1] if readouts else ""],
            )
            text = page.text_content("#readout")
            shown, x, y, value = READOUT.fullmatch(text).groups()
            assert int(shown) == index
            expected = view.depth[int(y), int(x)]
            step = (view.max_depth - view.min_depth) / 65535
            assert abs(float(value) - expected) <= step + 1e-3, (text, expected)
            readouts.append(text)
        assert len(set(readouts)) == 3, readouts
        page.check("input[name=overlay][value=confidence]")
        overlay = page.get_attribute("#overlay", "src")
        assert page.locator("#overlay").is_visible()
        assert overlay == f"data:image/png;base64,{view.raw['confidence']['base64']}"
        page.check("input[name=overlay][value=none]")
        assert not page.locator("#overlay").is_visible()
        check_legend(page, view)


def check_legend(page, view) -> None:
    """The legend names the depths the preview's colours span, near to far: the view's 2nd and
    98th depth percentiles (the server's rule), within 1 % of the depth range (the browser
    reads them from the 16-bit PNG and a sample of it)."""
    page.wait_for_selector("#legend:not([hidden])")
    near = float(page.get_attribute("#legend", "data-near"))
    far = float(page.get_attribute("#legend", "data-far"))
    tolerance = 0.01 * (view.max_depth - view.min_depth)
    assert abs(near - np.percentile(view.depth, 2)) <= tolerance
    assert abs(far - np.percentile(view.depth, 98)) <= tolerance
    assert page.text_content("#legend-near") == f"near {near:.2f} rel."
    assert page.text_content("#legend-far") == f"far {far:.2f} rel."


def check_downloads(page, shown: dict, direct: dict, tmp_path: Path) -> None:
    """One entry per returned output. An inline one downloads exactly the bytes the API
    returned, under the name the Python client's save_all gives it; a stored one downloads,
    by the server's signed link, the bytes of the file it stored."""
    saved = parse_response(direct).save_all(tmp_path / "client", "da3")
    client_files = {path.name: path.read_bytes() for path in saved if path.suffix != ".json"}
    expected = returned_outputs(direct)
    entries = page.locator("#downloads li")
    listed, stored, downloaded = set(), set(), {}
    for i in range(entries.count()):
        entry = entries.nth(i)
        output, view = entry.get_attribute("data-output"), entry.get_attribute("data-view")
        listed.add((output, view))
        placed = expected[(output, view)]
        if "base64" in placed:
            with page.expect_download() as info:
                entry.locator("button").click()
            download = info.value
            assert download.suggested_filename == entry.get_attribute("data-file")
            downloaded[download.suggested_filename] = Path(download.path()).read_bytes()
            assert downloaded[download.suggested_filename] == base64.b64decode(placed["base64"])
        else:
            stored.add(output)  # downloaded from the server by its signed link
            assert "stored on the server" in entry.text_content()
            with page.expect_download() as info:
                entry.locator("a").click()
            assert info.value.suggested_filename == entry.get_attribute("data-file")
            assert Path(info.value.path()).read_bytes() == Path(placed["path"]).read_bytes()
    assert listed == set(expected)
    assert downloaded == client_files
    # Every format comes as a button; the views' point clouds pass MAX_RESPONSE_BYTES.
    formats = {name.rsplit(".", 1)[-1] for name in downloaded}
    assert {"png", "npy", "exr", "ply", "glb", "zip"} <= formats, formats
    assert stored == {"pointcloud"}
    assert shown["scene"] == direct["scene"]


def returned_outputs(response: dict) -> dict[tuple[str, str], dict]:
    """(output, view) -> its placement ({"base64"} or {"path"}), for every returned output."""
    outputs = {}
    for index, view in enumerate(response["views"]):
        depth = view["image_base64"]
        outputs[("depth", str(index))] = {"base64": depth} if depth else {"path": view["file_path"]}
        for name, entry in view.items():
            if isinstance(entry, dict) and "media_type" in entry:
                outputs[(name, str(index))] = entry
    for name in SCENE_FILES:
        if response.get(name):
            outputs[(name, "scene")] = response[name]
    return outputs


def check_orbit(page) -> None:
    cloud = page.locator("#cloud canvas")
    cloud.scroll_into_view_if_needed()
    box = cloud.bounding_box()
    before = cloud.screenshot()
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 400, box["y"] + 250, steps=10)
    page.mouse.up()
    page.wait_for_timeout(300)  # let the animation loop draw the rotated view
    assert cloud.screenshot() != before  # it orbits


@pytest.mark.slow
def test_playground_video(server, tmp_path):
    """A 2 s pan at 10 fps, sampled at 5 fps (10 frames) in chunks of 3 overlapping by 1: the
    page shows every chunk summary it polled while the job ran, then the finished sequence;
    the WebM preview plays in the video element; the line in the three.js scene runs through
    the camera centres the API returns for the same request (its TUM file, in three.js's
    axes)."""
    clip = tmp_path / "pan.mp4"
    clip.write_bytes(make_video(constant_rate(2.0, 10)))
    polled: list[dict] = []
    with playground_page(server) as page:
        page.on("response", lambda r: "/status/" in r.url and polled.append(r.json()))
        choose_sequence(page, server, clip, "a video", fps="5")
        check_video_cancel(page, server)
        page.click("#run")
        page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=120_000)
        assert page.get_attribute("body", "data-state") == "done", page.text_content("#status")
        request, response, shown = page.evaluate(
            "[__playground.request, __playground.response, __playground.progress]"
        )
        check_video_progress(polled, shown, response)
        chunks = len(response["sequence"]["chunks"])
        assert page.text_content("#status").startswith(
            f"depth-anything/DA3-SMALL: 10 frames in {chunks} chunk(s)"
        )
        check_trajectory(page, server, request)
        # The WebM preview decodes in the browser: its frames' size is the depth's.
        page.wait_for_function("document.getElementById('preview-video').videoWidth > 0")
        size = page.evaluate(
            "[...['videoWidth', 'videoHeight']].map(k => "
            "document.getElementById('preview-video')[k])"
        )
        assert size == [response["width"] - response["width"] % 2,
                        response["height"] - response["height"] % 2]  # fmt: skip
        files = page.eval_on_selector_all(
            "#downloads li", "items => items.map(i => i.dataset.file)"
        )
        assert sorted(files) == [
            "da3.preview_video.webm",
            "da3.scene.ply",
            "da3.trajectory.zip",
        ]
        keep_screenshot(page, tmp_path, "playground-video.png")


@pytest.mark.slow
def test_playground_frames_zip(server, tmp_path):
    """A zip of 6 frames (crops panning across a photo) goes as frames_zip_base64, byte for
    byte, in a sequence job: the page shows the finished sequence and draws the API's
    trajectory for the same request."""
    archive = tmp_path / "frames.zip"
    with Image.open(IMAGES / "soh-000.png") as photo, zipfile.ZipFile(archive, "w") as zipped:
        for index in range(6):
            crop = photo.convert("RGB").crop((60 * index, 100, 60 * index + 320, 340))
            frame = io.BytesIO()
            crop.save(frame, format="PNG")
            zipped.writestr(f"frames/f{index}.png", frame.getvalue())
    with playground_page(server) as page:
        choose_sequence(page, server, archive, "a zip of frames")
        page.click("#run")
        page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=120_000)
        assert page.get_attribute("body", "data-state") == "done", page.text_content("#status")
        request, response = page.evaluate("[__playground.request, __playground.response]")
        assert base64.b64decode(request["frames_zip_base64"].split(",", 1)[1]) == (
            archive.read_bytes()
        )
        assert "video_base64" not in request and response["sequence"]["frames"] == 6
        assert page.text_content("#status").startswith("depth-anything/DA3-SMALL: 6 frames in")
        check_trajectory(page, server, request, frames=6)


def choose_sequence(page, server: str, file: Path, what: str, **fields: str) -> None:
    """Open the playground with the key, small sizes (process_res 56, 2000 points, chunks of
    3) and `fields` filled in, choose `file` and wait until the page calls it `what`."""
    page.goto(server)
    page.wait_for_selector("#model option[value='depth-anything/DA3-SMALL']", state="attached")
    values = {"api-key": TEST_API_KEY, "process-res": "56", "max-points": "2000",
              "chunk-size": "3", **fields}  # fmt: skip
    for field, value in values.items():
        page.fill(f"#{field}", value)
    page.set_input_files("#file", str(file))
    page.wait_for_function(
        "what => document.getElementById('status').textContent.includes(what)", arg=what
    )


def check_video_cancel(page, server: str) -> None:
    """Cancel while the video job runs (its status polls held by the test): the page sends
    POST /cancel/<id>, says so as no error, and the server's job ends CANCELLED."""
    page.route("**/status/**", lambda route: None)  # never answered
    with page.expect_response("**/run") as queued:
        page.click("#run")
    job = queued.value.json()["id"]
    with page.expect_request(f"**/cancel/{job}"):
        page.click("#cancel")
    page.wait_for_selector("body[data-state=cancelled]")
    assert page.text_content("#status") == "Cancelled."
    page.unroute("**/status/**")
    headers = {"X-API-Key": TEST_API_KEY}
    for _ in range(600):
        body = httpx.get(f"{server}/status/{job}", headers=headers).json()
        if body["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
            break
        time.sleep(0.1)
    assert body["status"] == "CANCELLED", body


def check_video_progress(polled: list[dict], shown: list[str], response: dict) -> None:
    """Each chunk summary polled while the job ran was shown, in order, and is one of the
    response's chunks; the last poll is the finished job."""
    assert polled and polled[-1]["status"] == "COMPLETED"
    running = [
        body["output"] for body in polled if body["status"] == "IN_PROGRESS" and "output" in body
    ]
    expected = list(dict.fromkeys(
        f"{s['frames_done']} of {s['frames_planned']} frames done (chunk {s['chunk']})…"
        for s in running
    ))  # fmt: skip
    assert shown == expected
    chunks = response["sequence"]["chunks"]
    assert all(summary["chunk"] < len(chunks) for summary in running)
    assert [c["frames_done"] for c in chunks][-1] == response["sequence"]["frames"] == 10


def check_trajectory(page, server: str, request: dict, frames: int = 10) -> None:
    """The line through the camera centres is the API's trajectory for the same request, in
    three.js's axes: diag(1, -1, -1) of the TUM file's tx ty tz."""
    body = httpx.post(f"{server}/runsync", json=request, headers={"X-API-Key": TEST_API_KEY},
                      timeout=300)  # fmt: skip
    assert body.status_code == 200, body.text
    centres = SequenceResult(body.json()).trajectory()[:, 1:4]
    drawn = np.array(page.evaluate("window.__trajectoryPoints"), np.float64)
    np.testing.assert_allclose(drawn, centres * [1, -1, -1], rtol=0, atol=1e-5)
    assert page.get_attribute("#cloud", "data-cameras") == str(frames)
    assert page.get_attribute("#cloud", "data-objects") == "2"  # the line and the points
    assert int(page.get_attribute("#cloud", "data-points")) > 100
