"""The self-hosted HTTP server.

Part one checks the transport itself (queueing, backpressure, body cap, jobs, error shapes,
metrics, logs, draining) over real HTTP with a service whose `handle` the test holds at a gate,
so concurrency is decided by the test rather than by timing. Part two runs `da3-serverless
serve` as a process with a random-weight da3-small and runs the v1 contract cases against it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import signal
import threading
import time
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest

from conftest import TEST_API_KEY
from contract_cases import (
    Context,
    case_auth,
    case_bad_inputs,
    case_base64,
    case_image_url,
    case_png16_and_npy,
    case_ssrf,
    from_http,
    serve_directory,
)
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.job import JobInfo
from da3_serverless.config import Settings
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.server import create_app
from da3_serverless.server.queue import JobStore
from da3_serverless.service import Service
from paths import IMAGES
from servers import app_in_thread, eventually, serve_process

KEY = "unit-test-key"


class GatedService:
    """Stands in for `Service` in the transport tests: `handle` waits at `gate`, then echoes
    which request it served (or raises the ServiceError the payload names). Auth and request
    checks are the real Service's."""

    authorize = Service.authorize
    model_key = Service.model_key
    batch_key = Service.batch_key
    default_model_id = Service.default_model_id

    def __init__(self) -> None:
        self.settings = settings()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.ready = True
        self.seen_keys: list[str | None] = []
        self.stopped = 0  # requests that saw their cancel flag at the gate
        self.discarded: list[dict[str, Any]] = []
        self.waiting_for_memory = 0  # requests the (absent) model cache holds back

    def discard(self, response: dict[str, Any]) -> None:
        self.discarded.append(response)

    def start(self) -> None:
        self.ready = True

    def model_table(self) -> list[dict[str, Any]]:
        return [{"model_id": "depth-anything/DA3-SMALL", "license": "Apache-2.0"}]

    def handle(
        self,
        payload: Any,
        api_key: str | None = None,
        cancel: CancelToken | None = None,
        job: JobInfo | None = None,
    ) -> dict[str, Any]:
        self.seen_keys.append(api_key)
        self.entered.release()
        deadline = time.monotonic() + 60
        while not self.gate.wait(0.01):  # held at the gate, stopping as Service does
            if cancel is not None and cancel.cancelled:
                self.stopped += 1
                raise ServiceError("cancelled", "stopped at the test's gate")
            assert time.monotonic() < deadline
        url = payload.get("image_url", "")
        tag = url.rsplit("/", 1)[-1]
        if "/raise/" in url:
            raise ServiceError(tag, "refused on purpose by the test")
        return {"schema_version": "1", "tag": tag, "width": 2, "height": 1}

    def handle_batch(self, items: list[tuple[Any, str | None, CancelToken | None]]) -> list[Any]:
        """A batch as the real service answers it: each request's response or error."""
        results: list[Any] = []
        for payload, api_key, cancel, *_ in items:
            try:
                results.append(self.handle(payload, api_key, cancel))
            except ServiceError as error:
                results.append(error)
        return results


def req(tag: object) -> dict[str, str]:
    """A well-formed v1 request; the stand-in service answers with `tag`."""
    return {"image_url": f"https://example.com/{tag}"}


def failing(code: str) -> dict[str, str]:
    """A well-formed v1 request the stand-in service refuses with `code`."""
    return {"image_url": f"https://example.com/raise/{code}"}


def settings(**overrides: Any) -> Settings:
    return Settings(api_key=KEY, max_queue=2, max_body_bytes=10_000, **overrides)


@pytest.fixture
def gated():
    service = GatedService()
    with app_in_thread(create_app(settings(), service)) as url:
        yield service, url


def post(url: str, body: Any, **kwargs: Any) -> httpx.Response:
    headers = {"X-API-Key": KEY, **kwargs.pop("headers", {})}
    return httpx.post(f"{url}/runsync", json=body, headers=headers, timeout=60, **kwargs)


def test_health_ready_models_openapi(gated):
    _, url = gated
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert httpx.get(f"{url}/models").json()[0]["license"] == "Apache-2.0"
    doc = httpx.get(f"{url}/openapi.json").json()
    assert {"/runsync", "/run", "/status/{job_id}", "/health", "/ready", "/models"} <= set(
        doc["paths"]
    )
    assert "RunRequest" in doc["components"]["schemas"]
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200 and "/static/vendor/swagger-ui/" in docs.text
    assert "cdn" not in docs.text  # works offline
    assert httpx.get(f"{url}/static/vendor/swagger-ui/swagger-ui-bundle.js").status_code == 200


def test_the_published_document_says_what_the_server_does(gated):
    _, url = gated
    doc = httpx.get(f"{url}/openapi.json").json()
    operations = [op for ops in doc["paths"].values() for op in ops.values()]
    assert not any("422" in op["responses"] for op in operations)  # refusals are 400
    assert doc["components"]["securitySchemes"] == {
        "bearerAuth": {"type": "http", "scheme": "bearer"},
        "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    for op in operations:  # a route that may answer 401 takes either key form
        assert ("security" in op) == ("401" in op["responses"]), op["summary"]
    # Requests the server takes and refuses, judged by the published schema.
    schemas = doc["components"]["schemas"]
    registry = {"components": {"schemas": schemas}}
    validator = jsonschema.Draft202012Validator({**schemas["RunRequest"], **registry})
    k = [[500.0, 0, 320], [0, 500, 240], [0, 0, 1]]
    accepted = [
        {"image_url": "https://x.test/a.png", "process_res": 56},
        {"images": [{"url": "https://x.test/a.png"}, {"base64": "AAAA"}], "intrinsics": k},
        {"images": [{"url": "https://x.test/a.png"}], "intrinsics": [k], "image_url": None},
    ]
    refused = [
        {},
        {"image_url": "https://x.test/a.png", "image_base64": "AAAA"},
        {"images": [{"url": "https://x.test/a.png", "base64": "AAAA"}]},
    ]
    for payload in accepted:
        assert validator.is_valid(payload), payload
    for payload in refused:
        assert not validator.is_valid(payload), payload
        answer = post(url, payload)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_input"


def test_bare_and_runpod_forms(gated):
    service, url = gated
    bare = post(url, req("a"))
    assert bare.status_code == 200 and bare.json()["tag"] == "a"
    assert bare.headers["x-request-id"]
    wrapped = post(url, {"input": req("b")})
    assert wrapped.status_code == 200
    assert wrapped.json()["status"] == "COMPLETED" and wrapped.json()["output"]["tag"] == "b"
    assert service.seen_keys == [KEY, KEY]  # the header key is handed to the service

    failed = post(url, {"input": failing("invalid_input")})
    assert failed.status_code == 400
    job = failed.json()
    assert job["status"] == "FAILED"
    assert json.loads(job["error"]) == {
        "code": "invalid_input", "status": 400, "message": "refused on purpose by the test",
    }  # fmt: skip
    bare_failed = post(url, failing("fetch_failed"))
    assert bare_failed.status_code == 502
    assert bare_failed.json() == {
        "error": {"code": "fetch_failed", "message": "refused on purpose by the test"},
        "status": 502,
    }
    extra = post(url, {"input": req("c"), "webhook": "http://x"})
    assert extra.status_code == 400 and "webhook" in json.loads(extra.json()["error"])["message"]


def test_errors_keep_the_v1_shape(gated):
    _, url = gated
    not_json = httpx.post(f"{url}/runsync", content=b"{not json", headers={"X-API-Key": KEY})
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_input"
    assert "JSON" in not_json.json()["error"]["message"]
    missing = httpx.get(f"{url}/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    unauthorized = post(url, req("x"), headers={"X-API-Key": "wrong"})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["www-authenticate"] == "Bearer"
    assert unauthorized.json()["error"]["code"] == "unauthorized"


def test_body_cap_before_reading_it_all(gated):
    service, url = gated
    big = {"image_base64": "x" * 20_000}
    declared = post(url, big)
    assert declared.status_code == 413
    assert "MAX_BODY_BYTES" in declared.json()["error"]["message"]

    def chunks():  # no Content-Length: the server must count while streaming
        for _ in range(30):
            yield b" " * 1000
        yield b"{}"

    streamed = httpx.post(f"{url}/runsync", content=chunks(), headers={"X-API-Key": KEY})
    assert streamed.status_code == 413
    assert service.seen_keys == []  # the service never saw either


def test_queue_then_backpressure_then_recovery(gated):
    """One inference at a time, two waiting (max_queue=2); the fourth gets 503 overloaded."""
    service, url = gated
    service.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, url, req(1))
        assert service.entered.acquire(timeout=30)  # running, holding the model
        queued = [pool.submit(post, url, req(i)) for i in (2, 3)]
        eventually(lambda: "da3_queue_depth 2.0" in httpx.get(f"{url}/metrics").text)
        refused = post(url, req(4))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["retry-after"]) > 0
        service.gate.set()
        results = [first.result(60), *(f.result(60) for f in queued)]
    assert [r.status_code for r in results] == [200, 200, 200]
    assert sorted(r.json()["tag"] for r in results) == ["1", "2", "3"]
    assert post(url, req(5)).status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert 'da3_errors_total{code="overloaded"} 1.0' in metrics
    assert 'da3_http_requests_total{path="/runsync",status="200"} 4.0' in metrics
    assert "da3_request_duration_seconds_bucket" in metrics


def poll_until(url: str, job_id: str, done: str, deadline_s: float = 60) -> dict[str, Any]:
    """GET /status until the job reaches `done` (bounded; a regression fails, never hangs)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/status/{job_id}", headers={"X-API-Key": KEY}).json()
        if status["status"] == done:
            return status
        assert status["status"] in ("IN_QUEUE", "IN_PROGRESS"), status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach {done} in {deadline_s} s")


def test_jobs(gated):
    service, url = gated
    service.gate.clear()
    submitted = httpx.post(f"{url}/run", json={"input": req("j")}, headers={"X-API-Key": KEY})
    assert submitted.status_code == 200
    job_id = submitted.json()["id"]
    assert submitted.json()["status"] == "IN_QUEUE"
    assert service.entered.acquire(timeout=30)
    key = {"X-API-Key": KEY}
    assert httpx.get(f"{url}/status/{job_id}", headers=key).json()["status"] == "IN_PROGRESS"
    # A job's output is for key holders only.
    anonymous = httpx.get(f"{url}/status/{job_id}")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    service.gate.set()
    status = poll_until(url, job_id, "COMPLETED")
    assert status["output"]["tag"] == "j" and status["executionTime"] >= 0

    bad = httpx.post(f"{url}/run", json=failing("invalid_input"), headers=key)
    failed = poll_until(url, bad.json()["id"], "FAILED")
    assert json.loads(failed["error"])["code"] == "invalid_input"
    malformed = httpx.post(f"{url}/run", json={"imag_url": "x"}, headers=key)
    assert malformed.status_code == 400  # refused at once, not as a failed job later
    assert "did you mean 'image_url'" in malformed.json()["error"]["message"]
    unknown = httpx.get(f"{url}/status/doesnotexist", headers=key)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_draining_refuses_new_work():
    service = GatedService()
    app = create_app(settings(), service)
    with app_in_thread(app) as url:
        app.state.drain()
        refused = post(url, req(1))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "model_unavailable"
        assert "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(f"{url}/ready").status_code == 503
        assert httpx.get(f"{url}/health").status_code == 200


class SlowLoadingService(GatedService):
    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.loaded = threading.Event()

    def start(self) -> None:
        assert self.loaded.wait(60)
        self.ready = True


def test_ready_is_503_until_the_model_loads():
    service = SlowLoadingService()
    with app_in_thread(create_app(settings(), service)) as url:
        assert httpx.get(f"{url}/ready").status_code == 503
        assert httpx.get(f"{url}/health").status_code == 200
        service.loaded.set()
        eventually(lambda: httpx.get(f"{url}/ready").status_code == 200)


def test_two_apps_have_their_own_metrics():
    """Per-app registries: a global one would raise "Duplicated timeseries" on the second app,
    or count one app's requests in the other's /metrics."""
    first, second = create_app(settings(), GatedService()), create_app(settings(), GatedService())
    with app_in_thread(first) as first_url, app_in_thread(second) as second_url:
        for _ in range(3):
            httpx.get(f"{first_url}/health")
        first_metrics = httpx.get(f"{first_url}/metrics").text
        second_metrics = httpx.get(f"{second_url}/metrics").text
    assert 'path="/health"' in first_metrics
    assert 'path="/health"' not in second_metrics


def test_one_json_log_line_per_request_without_secrets(gated, caplog):
    _, url = gated
    caplog.set_level(logging.INFO, logger="da3_serverless.server")
    post(url, {"image_base64": base64.b64encode(b"secret-pixels").decode()})

    def request_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "request"]

    eventually(request_lines, 10, "the request's log line")  # written once the answer is sent
    time.sleep(0.2)  # and no second one
    lines = request_lines()
    assert len(lines) == 1
    fields = lines[0].fields
    assert fields["path"] == "/runsync" and fields["status"] == 200 and fields["request_id"]
    text = json.dumps(fields)
    assert KEY not in text and "c2VjcmV0" not in text


# --- part two: `da3-serverless serve` with a random-weight model, the v1 contract ---


@pytest.fixture(scope="module")
def photos_url():
    with serve_directory(IMAGES) as url:
        yield url


@pytest.fixture(scope="module")
def service_env_module(hf_cache, tmp_path_factory) -> dict[str, str]:
    """`service_env` for servers shared by a module's tests (its own workspace)."""
    import conftest

    workdir = tmp_path_factory.mktemp("service")
    return conftest.service_env.__wrapped__(hf_cache, workdir)


@pytest.fixture(scope="module")
def server(service_env_module, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(service_env_module, log) as (url, _):
        yield url


@pytest.fixture(scope="module")
def strict_server(service_env_module, tmp_path_factory):
    """The same server with private image URLs refused (the default)."""
    env = {k: v for k, v in service_env_module.items() if k != "DA3_ALLOW_PRIVATE_URLS"}
    log = tmp_path_factory.mktemp("serve-strict") / "serve.log"
    with serve_process(env, log) as (url, _):
        yield url


@pytest.fixture(scope="module")
def reference_depth(small_snapshot):
    from da3_serverless.inference.predictor import Predictor

    predictor = Predictor.from_pretrained(small_snapshot, device="cpu")

    def depth(name: str, process_res: int) -> np.ndarray:
        return predictor.predict(str(IMAGES / name), process_res=process_res).depth[0]

    return depth


def http_call(url: str):
    def call(payload: dict[str, Any], headers: dict[str, str] | None) -> tuple[int | None, dict]:
        response = httpx.post(f"{url}/runsync", json=payload, headers=headers, timeout=300)
        return from_http(response.status_code, response.json())

    return call


def envelope_call(url: str):
    """The RunPod form against the same server: RunPod's envelope, mapped back."""

    def call(payload: dict[str, Any], headers: dict[str, str] | None) -> tuple[int | None, dict]:
        response = httpx.post(f"{url}/runsync", json={"input": payload}, headers=headers,
                              timeout=300)  # fmt: skip
        return from_http(response.status_code, response.json())

    return call


def context(photos_url: str, reference=None) -> Context:
    return Context(IMAGES, lambda name: f"{photos_url}/{name}", TEST_API_KEY, reference)


@pytest.mark.slow
def test_contract_over_http(server, photos_url, reference_depth):
    ctx = context(photos_url, reference_depth)
    call = http_call(server)
    case_base64(call, ctx)
    case_image_url(call, ctx)
    case_png16_and_npy(call, ctx)
    case_bad_inputs(call, ctx)
    case_auth(call, ctx)


@pytest.mark.slow
def test_contract_over_http_runpod_form(server, photos_url):
    ctx = context(photos_url)
    call = envelope_call(server)
    case_base64(call, ctx)
    case_bad_inputs(call, ctx)
    case_auth(call, ctx)


@pytest.mark.slow
def test_ssrf_refused(strict_server, photos_url):
    case_ssrf(http_call(strict_server), context(photos_url))


@pytest.mark.slow
@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {TEST_API_KEY}"},
        {"X-API-Key": TEST_API_KEY},
        {"da3-api-key": TEST_API_KEY},
    ],
    ids=["bearer", "x-api-key", "da3-api-key"],
)
def test_header_auth(server, headers):
    photo = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()
    payload = {"image_base64": photo, "process_res": 70}
    ok = httpx.post(f"{server}/runsync", json=payload, headers=headers, timeout=300)
    assert ok.status_code == 200, ok.text
    assert ok.json()["width"] == 1208
    wrong = {name: value.replace(TEST_API_KEY, "nope") for name, value in headers.items()}
    refused = httpx.post(f"{server}/runsync", json=payload, headers=wrong, timeout=300)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


@pytest.mark.slow
def test_served_endpoints(server):
    assert httpx.get(f"{server}/ready").json()["ready"] is True
    table = httpx.get(f"{server}/models").json()
    assert any(row["model_id"] == "depth-anything/DA3-SMALL" for row in table)
    assert all(row["license"] for row in table)
    assert "da3_model_ready 1.0" in httpx.get(f"{server}/metrics").text
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(f"{server}/static/vendor/three/three.module.js").status_code == 200


@pytest.mark.slow
def test_graceful_shutdown(service_env_module, tmp_path):
    """SIGTERM while a request runs: it still gets its answer, then the process ends."""
    photo = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()
    payload = {"image_base64": photo, "process_res": 1008, "output_metric": False}
    headers = {"X-API-Key": TEST_API_KEY}
    with serve_process(service_env_module, tmp_path / "serve.log") as (url, process):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                httpx.post, f"{url}/runsync", json=payload, headers=headers, timeout=300
            )
            eventually(
                lambda: "da3_inflight 1.0" in httpx.get(f"{url}/metrics").text or running.done()
            )
            assert not running.done(), running.result().text
            process.send_signal(signal.SIGTERM)
            answer = running.result()
        assert answer.status_code == 200, answer.text
        assert answer.json()["width"] == 1208
        # uvicorn re-raises the signal once it has shut down gracefully.
        assert process.wait(60) in (0, -signal.SIGTERM)
    log = (tmp_path / "serve.log").read_text()
    request_lines = [json.loads(line) for line in log.splitlines() if '"msg": "request"' in line]
    assert any(line["path"] == "/runsync" and line["status"] == 200 for line in request_lines)
    assert TEST_API_KEY not in log and photo[:200] not in log


def test_job_store_bounds_count_and_age():
    store = JobStore(max_jobs=2, ttl_s=3600)
    first, second = store.new(), store.new()
    first.status, first.finished = "COMPLETED", time.monotonic()
    third = store.new()  # over the count: the oldest finished job goes, running ones stay
    assert store.get(first.id) is None
    assert store.get(second.id) is second and store.get(third.id) is third
    expiring = JobStore(max_jobs=10, ttl_s=0)
    done = expiring.new()
    done.status, done.finished = "FAILED", time.monotonic() - 1
    assert expiring.get(done.id) is None


def test_deeply_nested_json_is_refused_before_parsing_not_a_crash(gated):
    _, url = gated
    for body in (b"[" * 5_000, b"[" * 50 + b"]" * 50):  # too many lists; nested too deeply
        answer = httpx.post(f"{url}/runsync", content=body, headers={"X-API-Key": KEY}, timeout=60)
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "image_too_large"
