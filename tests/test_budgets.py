"""Resource budgets: what one request may cost, models pinned while in use, finished jobs
bounded by bytes, settings checked at start, the server's connection limit, and what `/ready`
tells strangers.

The request budget is checked with real image bytes whose headers claim a size and whose pixel
data is cut short, and with a model the cache cannot load: a refusal that came after decoding
would say `invalid_input`, one after loading `model_unavailable`; the budget says
`request_too_large` first. The same runs through the self-hosted server and RunPod's local API.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import SMALL_REPO, TEST_API_KEY, offline_settings, place_in_hf_cache
from contract_cases import png_header_only
from da3_serverless.api.budget import (
    CPU_BUDGET_PIXELS,
    CPU_BUDGET_TOKENS,
    GPU_BYTES_PER_TOKEN,
    MIN_BUDGET_TOKENS,
    Budget,
    default_budget,
    estimate_cost,
    request_budget,
)
from da3_serverless.api.errors import ServiceError
from da3_serverless.client import Client, DA3Error
from da3_serverless.config import Settings, SettingsError, load_settings
from da3_serverless.inference.cache import ModelCache, estimated_bytes, model_bytes
from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import MAX_PROCESS_RES, processing_size
from da3_serverless.server import create_app
from da3_serverless.server.queue import COMPLETED, JobStore, Scheduler
from da3_serverless.service import Service
from paths import IMAGES
from servers import app_in_thread, eventually, runpod_local_api, serve_command, serve_process
from test_http_server import KEY, GatedService, poll_until, post, req

BASE_REPO = "depth-anything/DA3-BASE"
PHOTO = IMAGES / "soh-000.png"
PHOTO_SIZE = (1208, 680)
# Claims 4000 x 4000 (under MAX_IMAGE_SIDE and the pixel budget) but holds almost no pixels.
HUGE_HEADER = base64.b64encode(png_header_only(4000, 4000)).decode()
# 144 x 144 = 20736 network tokens at process_res 2016: over the CPU default of 8192.
OVERSIZED = {"image_base64": HUGE_HEADER, "process_res": 2016, "model_id": "da3-base"}


def refused(fn, *args, **kwargs) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        fn(*args, **kwargs)
    return caught.value


# --- the estimate and the budget ------------------------------------------------------------


def test_the_cost_counts_network_tokens_and_output_pixels():
    cost = estimate_cost(SMALL_REPO, 504, [PHOTO_SIZE, (4000, 3000), (680, 1208)])
    grid = processing_size(*PHOTO_SIZE, 504)
    assert cost.grid == grid == (504, 280)  # every view goes to the first view's grid
    assert cost.tokens == 3 * (504 // 14) * (280 // 14) == 3 * 720
    assert cost.pixels == 1208 * 680 * 2 + 4000 * 3000
    assert (cost.views, cost.process_res, cost.model_id) == (3, 504, SMALL_REPO)
    # EXIF rotation swaps the sides of the grid, not the counts.
    rotated = estimate_cost(SMALL_REPO, 504, [(680, 1208)])
    assert rotated.tokens == 720 and rotated.pixels == cost.pixels // 2 - 4000 * 3000 // 2


def test_over_budget_says_what_to_lower():
    budget = Budget(tokens=1000, pixels=1_000_000)
    budget.check(estimate_cost(SMALL_REPO, 504, [PHOTO_SIZE]))  # 720 tokens, 821k pixels
    error = refused(budget.check, estimate_cost(SMALL_REPO, 504, [PHOTO_SIZE] * 2))
    assert (error.code, error.status) == ("request_too_large", 413)
    assert "1440 network tokens (2 x 36 x 20)" in error.message
    assert "lower process_res or send fewer views" in error.message
    assert "pixels" in error.message and "send smaller images or fewer views" in error.message
    only_tokens = refused(budget.check, estimate_cost(SMALL_REPO, 1008, [(640, 480)]))
    assert "process_res 1008" in only_tokens.message and "pixels" not in only_tokens.message


def test_default_budgets_per_device():
    gib = 1024**3
    cpu = default_budget("cpu", 0, 8 * gib, 24 * gib)
    assert (cpu.tokens, cpu.pixels) == (CPU_BUDGET_TOKENS, CPU_BUDGET_PIXELS)
    assert "default for cpu" in cpu.describe()
    # A GPU's default grows with the memory free at start beyond the models' share.
    small = default_budget("cuda", 23 * gib, 12 * gib, 64 * gib)
    large = default_budget("cuda", 140 * gib, 70 * gib, 256 * gib)
    assert small.tokens == 11 * gib // GPU_BYTES_PER_TOKEN
    assert large.tokens == 70 * gib // GPU_BYTES_PER_TOKEN > 5 * small.tokens > CPU_BUDGET_TOKENS
    assert large.pixels > small.pixels >= CPU_BUDGET_PIXELS
    starved = default_budget("cuda", 4 * gib, 12 * gib, 8 * gib)
    assert starved.tokens == MIN_BUDGET_TOKENS  # still one 504 px view
    # Settings win; a missing one comes from the device.
    assert request_budget(5, 6, lambda: pytest.fail("not needed")) == Budget(5, 6, "settings")
    mixed = request_budget(5, None, lambda: cpu)
    assert (mixed.tokens, mixed.pixels) == (5, CPU_BUDGET_PIXELS)


def test_oversized_requests_are_refused_before_decoding_or_loading(hf_cache, tmp_path):
    service = Service(offline_settings(hf_cache, tmp_path))
    assert service.budget == Budget(CPU_BUDGET_TOKENS, CPU_BUDGET_PIXELS, "default for cpu")
    payload = {"api_key": TEST_API_KEY, **OVERSIZED}
    start = time.perf_counter()
    error = refused(service.handle, payload)
    elapsed = time.perf_counter() - start
    assert (error.code, error.status) == ("request_too_large", 413), error
    assert "20736 network tokens" in error.message and "lower process_res" in error.message
    assert elapsed < 1.0  # the bound
    assert service.model_cache.loaded() == []
    # Within budget, the same bytes reach the decoder (cut short) ...
    truncated = refused(service.handle, {**payload, "process_res": 504})
    assert truncated.code == "invalid_input" and "truncated" in truncated.message
    # ... and a decodable image reaches the model loader (da3-base is not in the cache).
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    missing = refused(service.handle, {**payload, "image_base64": photo, "process_res": 504})
    assert missing.code == "model_unavailable"


def test_the_pixel_budget_counts_every_view(hf_cache, tmp_path):
    service = Service(offline_settings(hf_cache, tmp_path, request_budget_pixels=1_000_000))
    assert service.budget.tokens == CPU_BUDGET_TOKENS and service.budget.pixels == 1_000_000
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    payload = {"api_key": TEST_API_KEY, "images": [{"base64": photo}] * 2, "process_res": 140}
    error = refused(service.handle, payload)
    assert error.code == "request_too_large" and "1642880 pixels" in error.message
    assert service.model_cache.loaded() == []


def largest_admitted_process_res(size: tuple[int, int], budget: int) -> int:
    """The largest process_res whose single view of `size` fits `budget` tokens."""
    admitted = [
        res
        for res in range(14, MAX_PROCESS_RES + 1)
        if estimate_cost(SMALL_REPO, res, [size]).tokens <= budget
    ]
    return admitted[-1]


@pytest.mark.slow
def test_the_largest_request_the_cpu_budget_admits_succeeds(hf_cache, tmp_path):
    service = Service(offline_settings(hf_cache, tmp_path))
    res = largest_admitted_process_res(PHOTO_SIZE, service.budget.tokens)
    assert estimate_cost(SMALL_REPO, res + 1, [PHOTO_SIZE]).tokens > service.budget.tokens
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    payload = {"api_key": TEST_API_KEY, "image_base64": photo}
    assert refused(service.handle, {**payload, "process_res": res + 1}).code == (
        "request_too_large"
    )
    body = service.handle({**payload, "process_res": res})
    assert (body["width"], body["height"]) == PHOTO_SIZE and body["image_base64"]


def test_the_client_does_not_retry_request_too_large():
    seen: list[httpx.Request] = []
    error = {"error": {"code": "request_too_large", "message": "lower process_res"}, "status": 413}
    job = {"id": "j", "status": "FAILED", "error": json.dumps({**error["error"], "status": 413})}

    for answer in (httpx.Response(413, json=error), httpx.Response(200, json=job)):
        seen.clear()

        def handler(request: httpx.Request, answer=answer) -> httpx.Response:
            seen.append(request)
            return answer

        client = Client("http://x", max_retries=3, transport=httpx.MockTransport(handler))
        with pytest.raises(DA3Error) as caught:
            client.run({})
        assert (caught.value.code, caught.value.status) == ("request_too_large", 413)
        assert len(seen) == 1


# --- both transports --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transport_env(hf_cache, tmp_path_factory) -> dict[str, str]:
    import conftest

    env = conftest.service_env.__wrapped__(hf_cache, tmp_path_factory.mktemp("budgets"))
    return {**env, "KEEP_ALIVE_S": "1", "MAX_HEADER_BYTES": "4096"}


def timed(call) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = call()
    return time.perf_counter() - start, response


@pytest.mark.slow
def test_oversized_requests_are_refused_within_a_second_by_the_server(transport_env, tmp_path):
    with serve_process(transport_env, tmp_path / "serve.log") as (url, _):
        headers = {"X-API-Key": TEST_API_KEY}
        answers = [
            timed(lambda: httpx.post(f"{url}/runsync", json=OVERSIZED, headers=headers))
            for _ in range(3)
        ]
        for _, answer in answers:
            assert answer.status_code == 413, answer.text
            assert answer.json()["error"]["code"] == "request_too_large"
        assert statistics.median(seconds for seconds, _ in answers) < 1.0
        models = httpx.get(f"{url}/models").json()
        assert [m["model_id"] for m in models if m["loaded"]] == [SMALL_REPO]  # no da3-base
        check_server_limits(url)
    log = (tmp_path / "serve.log").read_text()
    assert f'"request budget: {CPU_BUDGET_TOKENS} network tokens' in log


def check_server_limits(url: str) -> None:
    """KEEP_ALIVE_S=1 closes idle connections; unfinished headers past MAX_HEADER_BYTES are
    refused."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):  # the whole response, then silence
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        assert sock.recv(4096) == b""  # closed by the server after its keep-alive timeout
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Headers that keep coming: refused once the unfinished part passes the limit.
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Padding: ".encode())
        sock.sendall(b"x" * 6000)
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")


@pytest.mark.slow
def test_oversized_requests_are_refused_within_a_second_by_the_runpod_worker(
    transport_env, tmp_path
):
    with runpod_local_api(transport_env, tmp_path / "worker.log") as url:
        payload = {"input": {"api_key": TEST_API_KEY, **OVERSIZED}}
        answers = [timed(lambda: httpx.post(f"{url}/runsync", json=payload)) for _ in range(3)]
        for _, answer in answers:
            job = answer.json()
            assert job["status"] == "FAILED", job
            assert json.loads(job["error"])["code"] == "request_too_large"
        assert statistics.median(seconds for seconds, _ in answers) < 1.0
    log = (tmp_path / "worker.log").read_text()
    assert f"request budget: {CPU_BUDGET_TOKENS} network tokens" in log


# --- models in use stay loaded ---------------------------------------------------------------


def test_a_model_in_use_is_never_evicted_and_nothing_loads_past_the_budget(small_snapshot):
    loads: list[str] = []

    def load(model_id: str) -> Predictor:
        loads.append(model_id)
        return Predictor.from_pretrained(small_snapshot, device="cpu")

    one = model_bytes(Predictor.from_pretrained(small_snapshot, device="cpu"))
    cache = ModelCache(load, budget_bytes=int(one * 1.5))  # room for one model
    results: list[str] = []
    with cache.use(SMALL_REPO) as small:
        second = threading.Thread(target=lambda: results.append(use_once(cache, BASE_REPO)))
        second.start()
        eventually(lambda: cache.waiting == 1, what="the second model to wait for memory")
        assert cache.loaded() == [SMALL_REPO] and loads == [SMALL_REPO]
        assert cache.get(SMALL_REPO) is small  # still there, still the same
        assert cache.in_use() == {SMALL_REPO: 1}
    second.join(60)
    assert results == [BASE_REPO] and loads == [SMALL_REPO, BASE_REPO]
    assert cache.loaded() == [BASE_REPO] and cache.in_use() == {} and cache.waiting == 0


def use_once(cache: ModelCache, model_id: str) -> str:
    with cache.use(model_id):
        return model_id


@pytest.fixture(scope="module")
def two_model_cache(small_snapshot, tmp_path_factory) -> Path:
    """An HF_HOME with the random da3-small as DA3-SMALL and as DA3-BASE (two cache keys)."""
    cache = tmp_path_factory.mktemp("two-models")
    place_in_hf_cache(small_snapshot, cache, SMALL_REPO)
    place_in_hf_cache(small_snapshot, cache, BASE_REPO)
    return cache


def test_concurrent_requests_for_two_models_share_a_budget_for_one(
    two_model_cache, small_snapshot, tmp_path
):
    """Three threads alternate two models through `Service.handle`: each load happens with no
    model in use, no model in use is ever missing from the cache, and every answer is right."""
    holder: dict[str, Service] = {}
    seen: list[tuple[str, dict, list]] = []
    loading = threading.Semaphore(1)  # a second load at once would find it taken

    def checked_load(model_id: str) -> Predictor:
        cache = holder["service"].model_cache
        seen.append((model_id, cache.in_use(), cache.loaded()))
        assert loading.acquire(blocking=False), "two models loading at once"
        try:
            return holder["service"]._load(model_id)
        finally:
            loading.release()

    one = model_bytes(Predictor.from_pretrained(small_snapshot, device="cpu"))
    assert estimated_bytes(BASE_REPO) > one  # the base's estimate alone passes the budget
    cache = ModelCache(checked_load, budget_bytes=int(one * 1.5))
    settings = offline_settings(two_model_cache, tmp_path)
    holder["service"] = service = Service(settings, model_cache=cache)
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    answers: list[str] = []

    def client(models: list[str]) -> None:
        for model in models:
            body = service.handle(
                {"api_key": TEST_API_KEY, "image_base64": photo, "process_res": 56,
                 "model_id": model, "output_metric": False}
            )  # fmt: skip
            answers.append(f"{model}->{body['model_id']}")

    plans = [["da3-small", "da3-base"], ["da3-base", "da3-small"], ["da3-small", "da3-base"]]
    threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(answers) == sorted(
        f"{m}->{SMALL_REPO if m == 'da3-small' else BASE_REPO}" for plan in plans for m in plan
    )
    assert len(seen) >= 2
    for model_id, in_use, loaded in seen:
        assert in_use == {}, f"{model_id} loaded while {in_use} were in use"
        assert len(loaded) <= 1, f"{model_id} loaded beside {loaded}"
    assert cache.in_use() == {} and len(cache.loaded()) == 1


def test_requests_waiting_for_memory_count_against_the_queue():
    waiting_for_memory = [0]
    scheduler = Scheduler(max_queue=2, also_waiting=lambda: waiting_for_memory[0])
    scheduler.admit()
    waiting_for_memory[0] = 1
    error = refused(scheduler.admit)
    assert error.code == "overloaded" and "2 requests waiting, limit 2" in error.message
    waiting_for_memory[0] = 0
    scheduler.admit()


# --- finished jobs bounded by bytes ----------------------------------------------------------


def finish(store: JobStore, size: int):
    job = store.new()
    job.status, job.output, job.size = COMPLETED, {"x": "y" * size}, size
    job.finished = time.monotonic()
    store.finished(job)
    return job


def test_finished_results_are_bounded_by_bytes():
    store = JobStore(max_jobs=100, ttl_s=3600, max_bytes=1000)
    first, second = finish(store, 400), finish(store, 400)
    assert store.get(first.id) is first
    running = store.new()  # unfinished jobs count nothing and are never dropped
    third = finish(store, 400)  # 1200 bytes: the oldest finished result goes
    assert store.get(first.id) is None and store.expired(first.id)
    assert store.get(second.id) is second and store.get(third.id) is third
    assert store.get(running.id) is running
    assert not store.expired("never-seen")
    huge = finish(store, 1001)  # alone over the bound: an error instead of the result
    assert huge.status == "FAILED" and huge.output is None
    assert huge.error.code == "request_too_large" and "MAX_JOB_BYTES=1000" in huge.error.message
    assert store.get(second.id) is second  # nothing else was pushed out for it


def test_status_of_a_dropped_job_says_it_expired():
    service = GatedService()
    settings = Settings(api_key=KEY, max_queue=2, max_body_bytes=10_000, max_job_bytes=150)
    key = {"X-API-Key": KEY}
    with app_in_thread(create_app(settings, service)) as url:
        ids = []
        for tag in ("first", "second"):  # each output is about 70 bytes of JSON
            job_id = httpx.post(f"{url}/run", json={"input": req(tag)}, headers=key).json()["id"]
            poll_until(url, job_id, "COMPLETED")
            ids.append(job_id)
        third = httpx.post(f"{url}/run", json={"input": req("third")}, headers=key).json()["id"]
        assert poll_until(url, third, "COMPLETED")["output"]["tag"] == "third"
        gone = httpx.get(f"{url}/status/{ids[0]}", headers=key)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
        assert "expired" in gone.json()["error"]["message"]
        assert "MAX_JOB_BYTES (150 bytes)" in gone.json()["error"]["message"]
        kept = httpx.get(f"{url}/status/{ids[1]}", headers=key)
        assert kept.status_code == 200 and kept.json()["output"]["tag"] == "second"
        unknown = httpx.get(f"{url}/status/nope", headers=key).json()["error"]["message"]
        assert "expired" not in unknown


# --- settings checked at start ---------------------------------------------------------------

INVALID = [
    ("MODEL_CONCURRENCY", "0", ">= 1"),
    ("MAX_QUEUE", "0", ">= 1"),
    ("MAX_JOBS", "0", ">= 1"),
    ("MAX_JOB_BYTES", "0", ">= 1"),
    ("JOB_TTL_S", "0", "> 0"),
    ("SHUTDOWN_GRACE_S", "-1", ">= 0"),
    ("REQUEST_BUDGET_TOKENS", "0", ">= 1"),
    ("REQUEST_BUDGET_PIXELS", "-5", ">= 1"),
    ("MODEL_MEMORY_BUDGET_GB", "0", "> 0"),
    ("MAX_VIEWS", "0", ">= 1"),
    ("MAX_PROCESS_RES", "5000", "14 to 2016"),
    ("MAX_IMAGE_SIDE", "0", "1 to 65535"),
    ("MAX_DOWNLOAD_BYTES", "0", ">= 1"),
    ("DOWNLOAD_TIMEOUT_S", "0", "> 0"),
    ("MAX_BODY_BYTES", "0", ">= 1"),
    ("MAX_RESPONSE_BYTES", "-1", ">= 0"),
    ("OUTPUT_RETENTION_DAYS", "0", "0.1 to 3650"),
    ("MAX_CONNECTIONS", "0", ">= 1"),
    ("KEEP_ALIVE_S", "0", "> 0, <= 300"),
    ("MAX_HEADER_BYTES", "100", "1024 to 1048576"),
    ("MAX_BATCH", "0", "1 to 256"),
    ("BATCH_WAIT_MS", "-1", "0 to 10000"),
    ("MAX_QUEUE", "many", ">= 1"),
    ("DA3_DTYPE", "fp64", "bfloat16"),
    ("DA3_DEVICE", "gpu", "cuda:N"),
    ("WARMUP", "maybe", "boolean"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), INVALID, ids=lambda v: str(v))
def test_each_invalid_setting_is_named_with_its_range(monkeypatch, name, value, allowed):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"{name}={value!r}" in message and allowed in message, message


def test_every_numeric_setting_has_a_range():
    for name, field in Settings.model_fields.items():
        annotation = str(field.annotation)
        if ("int" in annotation or "float" in annotation) and "bool" not in annotation:
            bounds = {k for item in field.metadata for k in ("ge", "gt") if getattr(item, k, None)
                      is not None}  # fmt: skip
            assert bounds, f"{name} has no lower bound"


def test_dtype_names_are_made_canonical():
    assert Settings(dtype="BF16").dtype == "bfloat16"
    assert Settings(dtype="fp32").dtype == "float32" and Settings().dtype is None


@pytest.fixture
def broken_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DA3_", "HF_", "RUNPOD"))}
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**env, "MODEL_CONCURRENCY": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": src}


@pytest.mark.parametrize(
    "command",
    [
        serve_command("serve", "--port", "0"),
        serve_command("prune"),
        [sys.executable, "-m", "da3_serverless.runpod_worker"],
    ],
    ids=["server", "cli", "worker"],
)
def test_processes_with_invalid_settings_exit_non_zero(broken_env, tmp_path, command):
    result = subprocess.run(
        command, env=broken_env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MODEL_CONCURRENCY='0': out of range; allowed: >= 1" in result.stderr


# --- the server's connection limit and /ready -------------------------------------------------


def test_the_connection_limit_answers_with_our_error_object():
    service = GatedService()
    settings = Settings(api_key=KEY, max_queue=4, max_body_bytes=10_000, max_connections=1)
    with app_in_thread(create_app(settings, service)) as url:
        service.gate.clear()
        holder = threading.Thread(target=lambda: post(url, req("held")))
        holder.start()
        assert service.entered.acquire(timeout=30)
        refused_ = post(url, req("second"))
        assert refused_.status_code == 503
        assert refused_.headers["content-type"] == "application/json"
        assert int(refused_.headers["retry-after"]) > 0
        body = refused_.json()
        assert body["status"] == 503 and body["error"]["code"] == "overloaded"
        assert "MAX_CONNECTIONS" in body["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200  # probes still answer
        assert httpx.get(f"{url}/ready").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'da3_errors_total{code="overloaded"} 1.0' in metrics
        service.gate.set()
        holder.join(30)
        assert post(url, req("after")).status_code == 200


class FailingStart(GatedService):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.ready = False
        self.error = error

    def start(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError("/secret/DA3-SMALL/model.safetensors: permission denied"), "model_unavailable"),
        (ServiceError("out_of_memory", "no memory at /secret/place"), "out_of_memory"),
    ],
)  # fmt: skip
def test_ready_says_a_state_and_a_code_never_the_reason(error, code, caplog):
    service = FailingStart(error)
    settings = Settings(api_key=KEY, model_id="/secret/models/DA3-SMALL")
    with app_in_thread(create_app(settings, service)) as url:
        eventually(lambda: httpx.get(f"{url}/ready").json()["state"] == "failed")
        answer = httpx.get(f"{url}/ready")
    assert answer.status_code == 503
    assert answer.json() == {"ready": False, "state": "failed", "model_id": None, "error": code}
    assert "secret" not in answer.text
    assert any("secret" in r.getMessage() or r.exc_info for r in caplog.records)


def test_ready_names_a_table_model_and_its_state():
    with app_in_thread(
        create_app(Settings(api_key=KEY, model_id="da3-small"), GatedService())
    ) as url:
        body = httpx.get(f"{url}/ready").json()
    assert body == {"ready": True, "state": "ready", "model_id": SMALL_REPO, "error": None}
