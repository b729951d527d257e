"""The Python client and `da3-serverless request`.

The protocol handling (polling, retries, RunPod's string errors) is checked against scripted
RunPod answers (httpx.MockTransport: RunPod's cloud is not reachable from tests). The same
end-to-end assertions then run against a self-hosted server and RunPod's local test API, both
serving a random-weight da3-small.
"""

from __future__ import annotations

import json
import logging

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TEST_API_KEY
from contract_cases import png_header_only, serve_directory
from da3_serverless.cli import main
from da3_serverless.client import Client, DA3Error
from paths import IMAGES
from servers import runpod_local_api, serve_process

ERROR_JSON = json.dumps({"code": "invalid_input", "status": 400, "message": "bad image"})


def scripted(answers: list[httpx.Response], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    return httpx.MockTransport(handler)


def test_runpod_polling_auth_and_body():
    seen: list[httpx.Request] = []
    output = {"schema_version": "1", "tag": 1}
    answers = [
        httpx.Response(200, json={"id": "j1", "status": "IN_QUEUE"}),
        httpx.Response(200, json={"id": "j1", "status": "IN_PROGRESS"}),
        httpx.Response(200, json={"id": "j1", "status": "COMPLETED", "output": output}),
    ]
    client = Client("https://api.runpod.ai/v2/abc/", api_key="ours", runpod_api_key="rp",
                    poll_interval=0, transport=scripted(answers, seen))  # fmt: skip
    assert client.run({"image_url": "https://example.com/a.jpg"}) == output
    assert [str(r.url) for r in seen] == [
        "https://api.runpod.ai/v2/abc/runsync?wait=90000",  # answered before its deadline
        "https://api.runpod.ai/v2/abc/status/j1",
        "https://api.runpod.ai/v2/abc/status/j1",
    ]
    assert all(r.headers["authorization"] == "Bearer rp" for r in seen)
    assert json.loads(seen[0].content) == {
        "input": {"image_url": "https://example.com/a.jpg", "api_key": "ours"},
        "policy": {"executionTimeout": 600_000, "ttl": 600_000},  # the client's 600 s timeout
    }


def test_errors_are_typed():
    for answer in (
        httpx.Response(200, json={"id": "j", "status": "FAILED", "error": ERROR_JSON}),
        httpx.Response(400, json={"id": "j", "status": "FAILED", "error": ERROR_JSON}),
        httpx.Response(
            400, json={"error": {"code": "invalid_input", "message": "bad image"}, "status": 400}
        ),
    ):
        client = Client("http://x", transport=scripted([answer], []))
        with pytest.raises(DA3Error) as caught:
            client.run({})
        assert (caught.value.code, caught.value.status, caught.value.message) == (
            "invalid_input", 400, "bad image",
        )  # fmt: skip
    plain = httpx.Response(200, json={"id": "j", "status": "FAILED", "error": "Job ID not found"})
    with pytest.raises(DA3Error, match="Job ID not found") as caught:
        Client("http://x", transport=scripted([plain], [])).run({})
    assert caught.value.code == "runpod_failed"
    proxy = httpx.Response(502, text="<html>bad gateway</html>")
    with pytest.raises(DA3Error) as caught:
        Client("http://x", transport=scripted([proxy], [])).run({})
    assert (caught.value.code, caught.value.status) == ("http_error", 502)


def test_retries_only_transient_failures_and_bounded():
    busy = {"error": {"code": "overloaded", "message": "busy"}, "status": 503}
    seen: list[httpx.Request] = []
    answers = [
        httpx.Response(503, json=busy, headers={"Retry-After": "0"}),
        httpx.Response(429, text="slow down", headers={"Retry-After": "0"}),
        httpx.Response(200, json={"id": "j", "status": "COMPLETED", "output": {"ok": 1}}),
    ]
    assert Client("http://x", transport=scripted(answers, seen)).run({}) == {"ok": 1}
    assert len(seen) == 3

    seen.clear()
    always_busy = [httpx.Response(503, json=busy, headers={"Retry-After": "0"})] * 3
    with pytest.raises(DA3Error) as caught:
        Client("http://x", max_retries=2, transport=scripted(always_busy, seen)).run({})
    assert caught.value.code == "overloaded" and len(seen) == 3

    seen.clear()
    bad = [httpx.Response(400, json={"error": {"code": "invalid_input", "message": "m"},
                                     "status": 400})]  # fmt: skip
    with pytest.raises(DA3Error):
        Client("http://x", transport=scripted(bad, seen)).run({})
    assert len(seen) == 1

    # A missing model is a 503 too, but waiting will not bring it: no retry.
    seen.clear()
    missing = {"error": {"code": "model_unavailable", "message": "m"}, "status": 503}
    answers = [httpx.Response(503, json=missing, headers={"Retry-After": "0"})]
    with pytest.raises(DA3Error) as caught:
        Client("http://x", transport=scripted(answers, seen)).run({})
    assert caught.value.code == "model_unavailable" and len(seen) == 1


# --- end to end: self-hosted server and RunPod's local API ---


@pytest.fixture(scope="module")
def env(hf_cache, tmp_path_factory) -> dict[str, str]:
    import conftest

    return conftest.service_env.__wrapped__(hf_cache, tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def self_hosted(env, tmp_path_factory):
    with serve_process(env, tmp_path_factory.mktemp("serve") / "serve.log") as (url, _):
        yield url


@pytest.fixture(scope="module")
def runpod_local(env, tmp_path_factory):
    with runpod_local_api(env, tmp_path_factory.mktemp("runpod") / "worker.log") as url:
        yield url


@pytest.fixture(scope="module", params=["self_hosted", "runpod_local"])
def endpoint(request) -> str:
    return request.getfixturevalue(request.param)


@pytest.mark.slow
def test_client_end_to_end(endpoint):
    photo = IMAGES / "soh-000.png"
    with Client(endpoint, api_key=TEST_API_KEY, timeout=300) as client:
        exact = client.depth(photo, process_res=140, outputs=["depth", "depth_npy", "preview"],
                             output_metric=False)  # fmt: skip
        assert exact.depth.shape == (680, 1208) and exact.depth.dtype == np.float32
        assert exact.intrinsics.shape == (3, 3) and exact.extrinsics.shape == (3, 4)
        assert exact.preview_image().size == (1208, 680)
        assert exact.raw["schema_version"] == "1" and exact.units == "relative"

        from_png = client.depth(photo.read_bytes(), process_res=140, output_metric=False)
        step = (from_png.max_depth - from_png.min_depth) / 65535
        assert np.abs(from_png.depth - exact.depth).max() <= step * 1.0001 + 1e-6
        assert from_png.preview is None

        views = client.depth([photo, Image.open(IMAGES / "soh-010.png")], process_res=140,
                             output_metric=False)  # fmt: skip
        assert len(views.views) == 2 and views.views[1].depth.shape == (680, 1208)

        with pytest.raises(DA3Error) as caught:
            client.depth(png_header_only(20000, 20000))
        assert (caught.value.code, caught.value.status) == ("image_too_large", 413)
        with pytest.raises(DA3Error) as caught:
            client.depth(photo, proces_res=140)
        assert caught.value.code == "invalid_input" and "process_res" in caught.value.message

    with Client(endpoint, api_key="wrong-key") as client, pytest.raises(DA3Error) as caught:
        client.depth(photo, process_res=140)
    assert (caught.value.code, caught.value.status) == ("unauthorized", 401)


@pytest.mark.slow
def test_client_image_url(self_hosted):
    with serve_directory(IMAGES) as photos, Client(self_hosted, api_key=TEST_API_KEY) as client:
        result = client.depth(f"{photos}/soh-010.png", process_res=140, output_metric=False)
    assert result.depth.shape == (680, 1208)


@pytest.mark.slow
def test_request_command(self_hosted, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    argv = ["request", str(IMAGES / "soh-000.png"), str(IMAGES / "soh-010.png"), "--endpoint",
            self_hosted, "--api-key", TEST_API_KEY, "--out", str(out), "--process-res", "140",
            "--relative"]  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        assert main(argv) == 0
    # It says what it wrote, and nothing of httpx's below WARNING.
    said = capsys.readouterr().out
    assert f"soh-010: wrote 3 file(s) to {out}: soh-010.depth.png, soh-010.preview.png" in said
    assert not [r for r in caplog.records if r.name.startswith("httpx")]
    for stem in ("soh-000", "soh-010"):
        with Image.open(out / f"{stem}.depth.png") as depth:
            assert depth.size == (1208, 680) and depth.mode.startswith("I")
        with Image.open(out / f"{stem}.preview.png") as preview:
            assert preview.size == (1208, 680)
        meta = json.loads((out / f"{stem}.json").read_text())
        assert meta["width"] == 1208 and meta["image_base64"].endswith("base64 chars>")

    bad = main(["request", str(IMAGES / "soh-000.png"), "--endpoint", self_hosted,
                "--api-key", "wrong", "--out", str(out)])  # fmt: skip
    assert bad == 1


def test_request_command_needs_an_endpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DA3_ENDPOINT", raising=False)
    assert main(["request", str(IMAGES / "soh-000.png"), "--out", str(tmp_path)]) == 2
    assert "--endpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_anchors_reach_both_transports(endpoint):
    """A known depth at three pixels brings da3-small's relative answer to metres."""
    photo = IMAGES / "soh-000.png"
    with Client(endpoint, api_key=TEST_API_KEY, timeout=300) as client:
        plain = client.depth(photo, process_res=112, output_metric=False)
        points = [[x + 0.5, y + 0.5, 3.0 * float(plain.depth[y, x])]
                  for x, y in ((100, 100), (600, 300), (1000, 500))]  # fmt: skip
        anchored = client.depth(photo, process_res=112, anchors={"points": points})
    fit = anchored.raw["anchors"]
    assert fit["fitted"] and abs(fit["scale"] / 3.0 - 1) < 1e-4 and fit["inliers"] == 3
    assert anchored.raw["units"] == "m"
    # depth arrives as 16-bit PNG: equal within one quantisation step of the scaled answer
    step = 3.0 * float(np.ptp(plain.depth)) / 65535
    np.testing.assert_allclose(anchored.depth, 3.0 * plain.depth, rtol=1e-4, atol=2 * step)


@pytest.mark.slow
def test_request_command_with_a_lidar_map(self_hosted, tmp_path):
    """`request --anchor-depth lidar.png --anchor-scale 0.001`: a 16-bit millimetre map at
    another resolution (the same field of view) fixes the scale."""
    photo = IMAGES / "soh-010.png"
    with Client(self_hosted, api_key=TEST_API_KEY, timeout=300) as client:
        plain = client.depth(photo, process_res=112, output_metric=False)
    rows = ((np.arange(48) + 0.5) * 680 / 48).astype(int)
    cols = ((np.arange(64) + 0.5) * 1208 / 64).astype(int)
    millimetres = np.round(2000.0 * plain.depth[np.ix_(rows, cols)] / plain.depth.mean())
    Image.fromarray(millimetres.astype(np.uint16)).save(tmp_path / "lidar.png")
    out = tmp_path / "out"
    argv = ["request", str(photo), "--endpoint", self_hosted, "--api-key", TEST_API_KEY,
            "--out", str(out), "--process-res", "112", "--outputs", "depth",
            "--anchor-depth", str(tmp_path / "lidar.png"), "--anchor-scale", "0.001"]  # fmt: skip
    assert main(argv) == 0
    fit = json.loads((out / "soh-010.json").read_text())["anchors"]
    assert abs(fit["scale"] * plain.depth.mean() / 2.0 - 1) < 1e-3, fit
    assert fit["outliers"] == 0 and fit["residual_m"]["p90"] < 0.01
