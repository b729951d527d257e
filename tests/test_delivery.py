"""The self-hosted server over real HTTP with a random-weight da3-small: one camera for every
view, and every stored output reaching the caller through the signed download link its
response gives (links that are forged, expired, unsigned or leave output_images/ refused)."""

from __future__ import annotations

import base64
import http.client
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from conftest import TEST_API_KEY, offline_settings
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.links import LinkSigner, add_links
from da3_serverless.cli import main
from da3_serverless.client import Client
from da3_serverless.config import SERVER_MAX_RESPONSE_BYTES, Settings
from da3_serverless.server import create_app
from da3_serverless.service import Service
from paths import IMAGES
from servers import app_in_thread, wait_ready

RES = 70
PHOTO = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
SCENE = ["scene_ply", "scene_glb", "colmap"]


@pytest.fixture(scope="module")
def served(hf_cache, tmp_path_factory) -> Iterator[tuple[str, Settings]]:
    """A server that stores every output but tiny ones (MAX_RESPONSE_BYTES 1000)."""
    workspace = tmp_path_factory.mktemp("workspace")
    settings = offline_settings(hf_cache, workspace, max_batch=1, max_response_bytes=1000)
    service = Service(settings)
    service.start()
    with app_in_thread(create_app(settings, service)) as url:
        yield url, settings


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


def runsync(url: str, payload: dict, path: str = "/runsync") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=payload, headers=AUTH, timeout=300)


def scene_request(**fields: object) -> dict:
    views = [{"base64": PHOTO}, {"base64": PHOTO}]
    outputs = ["depth", "preview", "depth_npy", *SCENE]
    return {"images": views, "process_res": RES, "outputs": outputs, "max_points": 2000, **fields}


def stored_entries(response: dict) -> list[tuple[str, str | None]]:
    """(path, url) of every stored output in a v1 response: each view's depth and extras, and
    the scene's."""
    entries = []
    for target in [response, *(response.get("views") or [])]:
        if target.get("file_path"):
            entries.append((target["file_path"], target.get("file_url")))
        for entry in target.values():
            if isinstance(entry, dict) and entry.get("path"):
                entries.append((entry["path"], entry.get("url")))
    return entries


def test_one_intrinsics_matrix_for_every_view_over_http(server):
    k = [[900.0, 0.0, 600.0], [0.0, 900.0, 340.0], [0.0, 0.0, 1.0]]
    views = [{"base64": PHOTO}] * 4
    answer = runsync(server, {"images": views, "process_res": RES, "intrinsics": [k]})
    assert answer.status_code == 200, answer.text
    assert [view["intrinsics"] for view in answer.json()["views"]] == [k] * 4
    focals = {"images": views, "process_res": RES, "focal_length_px": [900, 900, 900]}
    refused = runsync(server, focals)
    assert refused.status_code == 400
    assert "focal_length_px has 3 numbers but the request has 4 view(s)" in refused.text


def test_every_stored_output_downloads_by_its_link(server):
    """/runsync (bare and RunPod's form), /run + /status and RunPod's /v2 path: every stored
    file has a link that gives its bytes, to a client without the key."""
    answers = [runsync(server, scene_request()).json()]
    answers.append(runsync(server, {"input": scene_request()}).json()["output"])
    answers.append(runsync(server, {"input": scene_request()}, "/v2/any/runsync").json()["output"])
    job = runsync(server, scene_request(), "/run").json()["id"]
    deadline = time.monotonic() + 300
    while (status := httpx.get(f"{server}/status/{job}", headers=AUTH).json())["status"] != (
        "COMPLETED"
    ):
        assert status["status"] in ("IN_QUEUE", "IN_PROGRESS") and time.monotonic() < deadline
        time.sleep(0.2)
    answers.append(status["output"])
    for answer in answers:
        entries = stored_entries(answer)
        # 2 views x (depth, preview, depth_npy), view 0 repeated at the top, and the scene.
        assert len(entries) == 3 * 3 + 3, entries
        assert "download link" in answer["warnings"][0]
        for path, url in entries:
            assert url is not None and url.startswith(f"{server}/files/"), (path, url)
            fetched = httpx.get(url)  # no key: the signature is the credential
            assert fetched.status_code == 200, fetched.text
            assert fetched.content == Path(path).read_bytes()
    glb = answers[0]["scene_glb"]
    assert httpx.get(glb["url"]).headers["content-type"] == glb["media_type"]


def signed(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path.rsplit("/", 1)[1], {k: v[0] for k, v in parse_qs(parts.query).items()}


def test_forged_expired_unsigned_and_escaping_links_are_refused(served, tmp_path):
    server, settings = served
    answer = runsync(server, {"image_base64": PHOTO, "process_res": RES, "outputs": ["preview"]})
    preview = answer.json()["preview"]
    name, query = signed(preview["url"])
    files = f"{server}/files"

    def refused(url: str, params: dict | None = None) -> tuple[int, str]:
        response = httpx.get(url, params=params)
        assert response.headers["content-type"] == "application/json", response.text
        return response.status_code, response.json()["error"]["code"]

    assert httpx.get(f"{files}/{name}", params=query).status_code == 200
    assert refused(f"{files}/{name}") == (401, "unauthorized")  # no signature: not a link
    last = "1" if query["signature"].endswith("0") else "0"
    forged = {**query, "signature": query["signature"][:-1] + last}
    assert refused(f"{files}/{name}", forged) == (401, "unauthorized")
    later = {**query, "expires": str(int(query["expires"]) + 1)}  # signed for another time
    assert refused(f"{files}/{name}", later) == (401, "unauthorized")
    other = signed(answer.json()["file_url"])[0]  # this signature names another file
    assert refused(f"{files}/{other}", query) == (401, "unauthorized")

    signer = LinkSigner.from_settings(settings.for_server())  # the server's own secret
    old = time.time() - signer.lifetime_s - 60
    status, code = refused(*signed_url(signer.link(f"{server}/", name, now=old)))
    assert (status, code) == (404, "not_found")

    # Names outside output_images/, signed with the server's own secret, and a link in it.
    outside = tmp_path / "secret.txt"
    outside.write_text("not an output")
    link_name = "0" * 32 + ".png"
    (settings.output_dir / link_name).symlink_to(outside)
    for escaping in ("..%2Fsecret.txt", "%2E%2E", "..", link_name, "config.json"):
        status, body = raw_get(server, urlsplit(signer.link("/", escaping)))
        assert status == 404 and "not an output" not in body, escaping
    for path in (f"/files/../../{outside}", f"/files/..%2F..%2F{outside}", "/files/%2e%2e"):
        status, body = raw_get(server, urlsplit(f"{path}?{urlsplit(preview['url']).query}"))
        assert status == 404 and "not an output" not in body, path

    Path(preview["path"]).unlink()  # pruned: its link is dead
    assert refused(preview["url"]) == (404, "not_found")


def raw_get(server: str, target) -> tuple[int, str]:
    """GET exactly this path and query (httpx would resolve `..` before sending)."""
    connection = http.client.HTTPConnection(urlsplit(server).netloc, timeout=60)
    try:
        connection.request("GET", f"{target.path}?{target.query}")
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def signed_url(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts._replace(query="").geturl(), {k: v[0] for k, v in parse_qs(parts.query).items()}


def test_the_client_and_the_cli_fetch_every_stored_file(server, tmp_path):
    with Client(server, api_key=TEST_API_KEY, timeout=300) as client:
        result = client.depth([IMAGES / "soh-000.png"] * 2, **scene_request(), return_base64=False)
        assert client.download_outputs(result) == []
    written = {path.name for path in result.save_all(tmp_path / "client", "s")}
    assert written == {
        "s.view0.depth.png", "s.view1.depth.png", "s.view0.preview.png", "s.view1.preview.png",
        "s.view0.depth.npy", "s.view1.depth.npy", "s.scene.ply", "s.glb", "s.colmap.zip",
        "s.json",
    }  # fmt: skip
    assert result.views[1].depth.shape == (680, 1208)
    assert result.scene_glb == Path(result.raw["scene_glb"]["path"]).read_bytes()

    out = tmp_path / "cli"
    argv = ["request", str(IMAGES / "soh-000.png"), str(IMAGES / "soh-010.png"), "--scene",
            "--endpoint", server, "--api-key", TEST_API_KEY, "--out", str(out), "--process-res",
            str(RES), "--max-points", "2000"]  # fmt: skip
    assert main(argv) == 0
    for name in ("scene.scene.ply", "scene.glb", "scene.colmap.zip", "scene.view1.preview.png"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow
def test_request_scene_at_default_settings_writes_every_scene_file(hf_cache, tmp_path):
    """The issue's proof: `request --scene` with three 1208x680 views at the default settings
    of the request and of the server writes the scene files locally."""
    import zipfile

    import trimesh

    settings = offline_settings(hf_cache, tmp_path / "workspace")
    assert settings.for_server().max_response_bytes == SERVER_MAX_RESPONSE_BYTES
    third = tmp_path / "soh-010-flipped.png"
    with Image.open(IMAGES / "soh-010.png") as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(third)
    photos = [IMAGES / "soh-000.png", IMAGES / "soh-010.png", third]
    with app_in_thread(create_app(settings)) as url:
        wait_ready(url, None, None)
        out = tmp_path / "garden"
        argv = ["request", *map(str, photos), "--scene", "--endpoint", url, "--api-key",
                TEST_API_KEY, "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
    assert len(trimesh.load(out / "scene.scene.ply").vertices) > 0
    assert len(trimesh.load(out / "scene.glb").geometry) > 0
    with zipfile.ZipFile(out / "scene.colmap.zip") as colmap:
        assert any(name.endswith("points3D.bin") for name in colmap.namelist())
    for index in range(3):
        with Image.open(out / f"scene.view{index}.depth.png") as depth:
            assert depth.size == (1208, 680)


def test_links_name_only_files_in_output_images_and_keep_bucket_urls(tmp_path):
    signer = LinkSigner(b"k" * 32, lifetime_s=60)
    root = tmp_path / "output_images"
    name = "a" * 32 + ".png"
    response = {
        "file_path": str(root / name),
        "preview": {"path": str(tmp_path / name), "media_type": "image/png"},  # elsewhere
        "colmap": {"path": str(root / name), "url": "https://bucket/x", "media_type": "z"},
        "views": None,
    }
    add_links(response, signer, "http://host/", root)
    assert "url" not in response["preview"] and response["colmap"]["url"] == "https://bucket/x"
    linked, query = signed(response["file_url"])
    assert response["file_url"].startswith(f"http://host/files/{name}?") and linked == name
    signer.check(name, query["expires"], query["signature"])
    with pytest.raises(ServiceError) as expired:
        signer.check(name, query["expires"], query["signature"], now=int(query["expires"]) + 1)
    assert expired.value.code == "not_found"
    other = LinkSigner(b"j" * 32, lifetime_s=60)  # another server's secret
    with pytest.raises(ServiceError) as forged:
        other.check(name, query["expires"], query["signature"])
    assert forged.value.code == "unauthorized"
