"""RunPod's endpoint API on the self-hosted server (`/v2/<endpoint_id>/...`), driven by RunPod's
own SDK (`runpod.Endpoint`, `runpod.endpoint_url_base` pointed at the server) and by plain HTTP.

Part one runs the real server with the gated stand-in service of `test_http_server.py`, so the
tests decide which job runs, waits or is cancelled. Part two runs `da3-serverless serve` with a
random-weight da3-small: the v1 contract over `/v2/<id>/runsync`, the SDK's `run_sync` and
`run` + `status` + `output`, and a cancel that stops a running inference.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
from typing import Any

import httpx
import pytest
import requests
import runpod

import contract_cases as cases
from conftest import TEST_API_KEY
from da3_serverless.client import Client, DA3Error
from da3_serverless.server import create_app
from paths import IMAGES, REPO
from servers import app_in_thread, eventually, serve_process
from test_http_server import KEY, GatedService, failing, req, settings

ENDPOINT_ID = "any-endpoint-id"


@pytest.fixture
def gated():
    service = GatedService()
    with app_in_thread(create_app(settings(), service)) as url:
        yield service, url


@pytest.fixture
def sdk(monkeypatch):
    """`endpoint(url)`: RunPod's SDK pointed at `url` (the base is read when the Endpoint is
    built, so it is set first)."""

    def endpoint(url: str, key: str = KEY) -> runpod.Endpoint:
        monkeypatch.setattr(runpod, "endpoint_url_base", f"{url}/v2")
        return runpod.Endpoint(ENDPOINT_ID, api_key=key)

    return endpoint


def v2(url: str, path: str) -> str:
    return f"{url}/v2/{ENDPOINT_ID}/{path}"


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_sdk_run_sync_and_run_status_output(gated, sdk):
    service, url = gated
    endpoint = sdk(url)
    assert endpoint.run_sync(req("a"), timeout=60)["tag"] == "a"
    job = endpoint.run(req("b"))
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert job.output(timeout=60)["tag"] == "b"
    assert job.status() == "COMPLETED"
    assert service.seen_keys == [KEY, KEY]  # the SDK's Bearer key reaches the service
    # A job that fails is HTTP 200 and FAILED: the SDK's run_sync returns no output.
    assert endpoint.run_sync(failing("fetch_failed"), timeout=60) is None


def test_sdk_cancel_queued_and_running_jobs(gated, sdk):
    service, url = gated
    endpoint = sdk(url)
    service.gate.clear()
    running = endpoint.run(req("a"))
    assert service.entered.acquire(timeout=30)
    queued = endpoint.run(req("b"))
    assert queued.status() == "IN_QUEUE"
    assert queued.cancel() == {"id": queued.job_id, "status": "CANCELLED"}
    assert queued.status() == "CANCELLED"
    assert endpoint.health()["jobs"]["inQueue"] == 0  # it left the queue at once
    assert running.cancel() == {"id": running.job_id, "status": "CANCELLED"}
    eventually(lambda: endpoint.health()["workers"]["idle"] == 1, 30, "the worker to be free")
    assert service.stopped == 1 and len(service.seen_keys) == 1  # the queued one never ran
    body = httpx.get(v2(url, f"status/{running.job_id}"), headers=bearer()).json()
    assert body["status"] == "CANCELLED" and "output" not in body
    assert json.loads(body["error"])["code"] == "cancelled"
    assert running.output() is None
    service.gate.set()
    assert endpoint.run_sync(req("c"), timeout=60)["tag"] == "c"  # still serving


def test_sdk_health_and_purge_queue(gated, sdk):
    service, url = gated
    endpoint = sdk(url)
    health = endpoint.health()
    assert health["workers"] == {"idle": 1, "initializing": 0, "ready": 1, "running": 0,
                                 "throttled": 0, "unhealthy": 0}  # fmt: skip
    service.gate.clear()
    running = endpoint.run(req("a"))
    assert service.entered.acquire(timeout=30)
    waiting = [endpoint.run(req(tag)) for tag in "bc"]
    jobs = endpoint.health()["jobs"]
    assert (jobs["inProgress"], jobs["inQueue"]) == (1, 2)
    assert endpoint.health()["workers"]["running"] == 1
    assert endpoint.purge_queue() == {"removed": 2, "status": "completed"}
    assert [job.status() for job in waiting] == ["CANCELLED", "CANCELLED"]
    assert endpoint.health()["jobs"]["inQueue"] == 0
    service.gate.set()
    assert running.output(timeout=60)["tag"] == "a"  # a running job is not purged
    eventually(lambda: endpoint.health()["workers"]["idle"] == 1, 30, "the worker to be free")
    assert endpoint.health()["jobs"]["completed"] == 1


def test_sdk_errors(gated, sdk):
    service, url = gated
    with pytest.raises(RuntimeError, match="401"):
        sdk(url, key="wrong").run(req("a"))
    with pytest.raises(RuntimeError, match="401"):
        sdk(url, key="wrong").health()
    endpoint = sdk(url)
    with pytest.raises(requests.HTTPError) as unknown:
        runpod.endpoint.Job(ENDPOINT_ID, "no-such-job", endpoint.rp_client).status()
    assert unknown.value.response.status_code == 404
    service.gate.clear()
    endpoint.run(req(1))
    assert service.entered.acquire(timeout=30)
    endpoint.run(req(2)), endpoint.run(req(3))  # the queue (max_queue=2) is full
    with pytest.raises(requests.HTTPError) as full:
        endpoint.run(req(4))
    assert full.value.response.status_code == 429
    assert int(full.value.response.headers["retry-after"]) > 0
    service.gate.set()


def test_runpods_body_limits(gated, sdk):
    """RunPod takes at most 10 MB on /run and 20 MB on /runsync: so do the /v2 paths (the
    server's own /runsync takes MAX_BODY_BYTES), and our client refuses before sending."""
    service, url = gated
    endpoint = sdk(url)
    photo = "A" * 12_000_000  # base64 text of a ~9 MB photo: over /run's limit, within /runsync's
    with pytest.raises(requests.HTTPError) as refused:
        endpoint.run({"input": {"image_base64": photo}})
    assert refused.value.response.status_code == 413
    body = refused.value.response.json()
    assert body["status"] == "FAILED" and body["id"]
    error = json.loads(body["error"])
    assert error["code"] == "image_too_large" and "MAX_RUN_BODY_BYTES" in error["message"]
    fits = httpx.post(v2(url, "runsync"), json={"input": {**req("big"), "api_key": KEY,
                      "image_base64": photo}}, headers=bearer(), timeout=60)  # fmt: skip
    assert fits.status_code == 200 and fits.json()["status"] == "FAILED"  # not for its size
    assert "exactly one of" in json.loads(fits.json()["error"])["message"]  # url and base64
    over = httpx.post(v2(url, "runsync"), json={"input": {"image_base64": "A" * 21_000_000}},
                      headers=bearer(), timeout=60)  # fmt: skip
    assert over.status_code == 413 and "MAX_RUNSYNC_BODY_BYTES" in over.json()["error"]
    assert service.seen_keys == []
    client = Client(f"{url}/v2/{ENDPOINT_ID}", api_key=KEY)
    with client, pytest.raises(DA3Error) as caught:
        client.depth(b"\x89PNG" + bytes(16_000_000))
    assert (caught.value.code, caught.value.status) == ("request_too_large", 413)
    assert "image_url" in caught.value.message and "20 MB on /runsync" in caught.value.message


def test_http_semantics(gated):
    _, url = gated
    failed = httpx.post(v2(url, "runsync"), json={"input": failing("invalid_input")},
                        headers=bearer())  # fmt: skip
    assert failed.status_code == 200 and failed.json()["status"] == "FAILED"
    assert json.loads(failed.json()["error"]) == {
        "code": "invalid_input", "status": 400, "message": "refused on purpose by the test",
    }  # fmt: skip
    # A request our checks refuse is a FAILED job too, at /run as well, with a pollable id.
    refused = httpx.post(v2(url, "run"), json={"input": {"imag_url": "x"}}, headers=bearer())
    assert refused.status_code == 200 and refused.json()["status"] == "FAILED"
    status = httpx.get(v2(url, f"status/{refused.json()['id']}"), headers=bearer()).json()
    assert "did you mean 'image_url'" in json.loads(status["error"])["message"]
    bare = httpx.post(v2(url, "run"), json=req("a"), headers=bearer())
    assert bare.status_code == 400 and "input" in json.loads(bare.json()["error"])["message"]
    for headers in ({}, bearer("wrong")):
        denied = httpx.post(v2(url, "run"), json={"input": req("a")}, headers=headers)
        assert denied.status_code == 401, denied.text
        assert json.loads(denied.json()["error"])["code"] == "unauthorized"
    assert httpx.get(v2(url, "health")).status_code == 401
    unknown = httpx.post(v2(url, "cancel/nope"), headers=bearer())
    assert unknown.status_code == 404
    # RunPod's bare `Authorization: <key>` works; the body's api_key wins over a header.
    plain = httpx.post(v2(url, "runsync"), json={"input": req("p")},
                       headers={"Authorization": KEY})  # fmt: skip
    assert plain.json()["output"]["tag"] == "p"
    body_key = httpx.post(v2(url, "runsync"), json={"input": {**req("k"), "api_key": KEY}},
                          headers=bearer("wrong"))  # fmt: skip
    assert body_key.json()["status"] == "COMPLETED"


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("wait=abc", "query parameter 'wait' must be an integer"),
        ("wait=" + "9" * 5000, "query parameter 'wait'"),  # never echoed, however long
        ("wait=1.5", "query parameter 'wait' must be an integer"),
    ],
)
def test_a_malformed_parameter_gets_a_short_message_in_runpods_form(gated, query, names):
    _, url = gated
    answer = httpx.post(f"{v2(url, 'runsync')}?{query}", json={"input": req("a")},
                        headers=bearer())  # fmt: skip
    assert answer.status_code == 400
    body = answer.json()
    assert set(body) == {"id", "status", "error"} and body["status"] == "FAILED"
    error = json.loads(body["error"])
    assert error["code"] == "invalid_input" and names in error["message"]
    assert len(answer.content) < 400 and "999999" not in error["message"]
    for leak in ("Traceback", ".py", "line ", "site-packages", "/work", "abc", "1.5"):
        assert leak not in error["message"], leak


def test_a_wrong_method_is_405_with_allow(gated):
    _, url = gated
    for method, path, allowed in (
        ("GET", v2(url, "runsync"), "POST"),
        ("DELETE", v2(url, "status/x"), "GET, POST"),  # two routes: both methods
        ("GET", f"{url}/runsync", "POST"),
    ):
        answer = httpx.request(method, path, headers=bearer())
        assert answer.status_code == 405, (method, path)
        assert answer.headers["Allow"] == allowed
        error = answer.json()["error"]
        message = json.loads(error)["message"] if "/v2/" in path else error["message"]
        assert f"use {allowed}" in message
    assert "| 405 |" in (REPO / "README.md").read_text()


def test_runsync_wait_then_poll(gated):
    service, url = gated
    service.gate.clear()
    answer = httpx.post(v2(url, "runsync?wait=1000"), json={"input": req("w")},
                        headers=bearer(), timeout=30)  # fmt: skip
    assert answer.status_code == 200
    job = answer.json()
    assert job["status"] in ("IN_QUEUE", "IN_PROGRESS") and job["id"]
    service.gate.set()

    def completed() -> dict[str, Any] | None:
        body = httpx.post(v2(url, f"status/{job['id']}"), headers=bearer()).json()
        return body if body["status"] == "COMPLETED" else None

    eventually(completed, 30, "the job to complete")
    assert completed()["output"]["tag"] == "w"


@pytest.mark.parametrize("path", ["/runsync", f"/v2/{ENDPOINT_ID}/runsync"])
def test_runsync_client_that_disconnects_cancels_its_job(gated, path):
    service, url = gated
    service.gate.clear()
    body = {"input": req("gone")}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{url}{path}", json=body, headers=bearer(), timeout=httpx.Timeout(30, read=1))
    eventually(lambda: service.stopped == 1, 30, "the job to stop")
    eventually(lambda: "da3_inflight 0.0" in httpx.get(f"{url}/metrics").text, 30, "a free worker")
    service.gate.set()
    assert httpx.post(f"{url}{path}", json=body, headers=bearer(), timeout=30).status_code == 200


def test_cancel_on_todays_paths(gated):
    service, url = gated
    key = {"X-API-Key": KEY}
    service.gate.clear()
    first = httpx.post(f"{url}/run", json={"input": req("a")}, headers=key).json()["id"]
    assert service.entered.acquire(timeout=30)
    second = httpx.post(f"{url}/run", json={"input": req("b")}, headers=key).json()["id"]
    assert httpx.post(f"{url}/cancel/{second}").status_code == 401
    assert httpx.post(f"{url}/cancel/nope", headers=key).status_code == 404
    for job_id in (second, first):
        answer = httpx.post(f"{url}/cancel/{job_id}", headers=key)
        assert answer.json() == {"id": job_id, "status": "CANCELLED"}
    eventually(lambda: service.stopped == 1, 30, "the running job to stop")
    for job_id in (first, second):
        status = httpx.get(f"{url}/status/{job_id}", headers=key).json()
        assert status["status"] == "CANCELLED"
        assert json.loads(status["error"])["code"] == "cancelled"
    assert len(service.seen_keys) == 1  # the queued job never ran
    # Cancelling a finished job changes nothing.
    service.gate.set()
    done = httpx.post(f"{url}/run", json={"input": req("c")}, headers=key).json()["id"]
    eventually(lambda: httpx.get(f"{url}/status/{done}", headers=key).json()["status"]
               == "COMPLETED", 30)  # fmt: skip
    assert httpx.post(f"{url}/cancel/{done}", headers=key).json()["status"] == "COMPLETED"


def test_purged_runsync_answers_cancelled(gated):
    """Today's /runsync waiting in the queue is a job too: purging the queue cancels it (499)."""
    service, url = gated
    service.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{url}/runsync", json=req(1), headers=bearer(),
                            timeout=60)  # fmt: skip
        assert service.entered.acquire(timeout=30)
        second = pool.submit(httpx.post, f"{url}/runsync", json=req(2), headers=bearer(),
                             timeout=60)  # fmt: skip
        eventually(lambda: "da3_queue_depth 1.0" in httpx.get(f"{url}/metrics").text, 30)
        purged = httpx.post(v2(url, "purge-queue"), headers=bearer()).json()
        assert purged == {"removed": 1, "status": "completed"}
        cancelled = second.result(60)
        assert cancelled.status_code == 499
        assert cancelled.json()["error"]["code"] == "cancelled"
        service.gate.set()
        assert first.result(60).status_code == 200


def test_our_client_on_runpods_paths(gated):
    service, url = gated
    with Client(f"{url}/v2/{ENDPOINT_ID}", api_key=KEY, timeout=60) as client:
        assert client.run(req("x"))["tag"] == "x"
        assert service.entered.acquire(timeout=30)  # x's entry: the next one is busy's
        service.gate.clear()
        httpx.post(v2(url, "run"), json={"input": req("busy")}, headers=bearer())
        assert service.entered.acquire(timeout=30)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.run, req("y"))
            eventually(lambda: "da3_queue_depth 1.0" in httpx.get(f"{url}/metrics").text, 30)
            httpx.post(v2(url, "purge-queue"), headers=bearer())
            with pytest.raises(DA3Error) as cancelled:
                waiting.result(60)
        assert (cancelled.value.code, cancelled.value.status) == ("cancelled", 499)
        service.gate.set()


# --- part two: `da3-serverless serve` with a random-weight da3-small ---


@pytest.fixture(scope="module")
def served(hf_cache, tmp_path_factory):
    """(URL, workspace) of a real server; private image URLs allowed (tests serve photos)."""
    import conftest

    workdir = tmp_path_factory.mktemp("service")
    env = conftest.service_env.__wrapped__(hf_cache, workdir)
    env["REQUEST_BUDGET_TOKENS"] = "100000"  # the cancel test's 8 views at process_res 1008
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(env, log) as (url, _):
        yield url, workdir / "workspace"


@pytest.fixture(scope="module")
def photos_url():
    with cases.serve_directory(IMAGES) as url:
        yield url


def v2_call(url: str) -> cases.Call:
    def call(payload: dict[str, Any], headers: dict[str, str] | None) -> tuple[int | None, dict]:
        response = httpx.post(v2(url, "runsync"), json={"input": payload}, headers=headers,
                              timeout=300)  # fmt: skip
        return cases.from_http(response.status_code, response.json())

    return call


@pytest.mark.slow
def test_contract_over_runpods_paths(served, photos_url):
    url, _ = served
    ctx = cases.Context(IMAGES, lambda name: f"{photos_url}/{name}", TEST_API_KEY)
    call = v2_call(url)
    cases.case_base64(call, ctx)
    cases.case_image_url(call, ctx)
    cases.case_bad_inputs(call, ctx)
    cases.case_auth(call, ctx)


@pytest.mark.slow
def test_sdk_against_the_real_server(served, sdk):
    url, _ = served
    endpoint = sdk(url, key=TEST_API_KEY)
    photo = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()
    payload = {"image_base64": photo, "process_res": cases.PROCESS_RES}
    output = endpoint.run_sync(payload, timeout=300)
    assert (output["width"], output["height"]) == (1208, 680)
    depth = cases.depth_from_png(output)
    assert depth.shape == (680, 1208) and output["min_depth"] <= output["max_depth"]
    job = endpoint.run({**payload, "outputs": ["depth", "preview"]})
    output = job.output(timeout=300)
    assert job.status() == "COMPLETED" and output["preview"]["media_type"] == "image/png"
    assert endpoint.health()["jobs"]["completed"] >= 2


@pytest.mark.slow
def test_cancel_stops_a_running_inference(served, photos_url, sdk):
    """Eight views at process_res 1008 take minutes on this CPU; cancelled a few seconds in,
    the worker is free again within a generous bound, no file is left, and it keeps serving."""
    url, workspace = served
    endpoint = sdk(url, key=TEST_API_KEY)
    outputs = workspace / "output_images"
    before = set(outputs.iterdir()) if outputs.exists() else set()  # other tests' files
    views = [{"url": f"{photos_url}/soh-{i % 2 * 10:03d}.png"} for i in range(8)]
    job = endpoint.run({"images": views, "process_res": 1008, "outputs": ["depth", "depth_npy"]})
    eventually(lambda: job.status() == "IN_PROGRESS", 120, "the job to start")
    time.sleep(3)  # into the network
    assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
    cancelled = time.monotonic()
    eventually(lambda: endpoint.health()["workers"]["idle"] == 1, 60, "the worker to be free")
    freed_s = time.monotonic() - cancelled
    assert freed_s < 60, freed_s
    assert job.status() == "CANCELLED"
    assert (set(outputs.iterdir()) if outputs.exists() else set()) == before
    small = {"image_url": f"{photos_url}/soh-000.png", "process_res": cases.PROCESS_RES}
    assert endpoint.run_sync(small, timeout=300)["width"] == 1208
