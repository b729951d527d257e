"""Batching on the self-hosted server: requests gathered for the window up to MAX_BATCH run as
one forward, answer exactly what they answer alone, and the server log shows the batches. The
gatherer itself runs in process on the real service (random-weight da3-small)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from batch_photos import assert_same_answer, base64_photos, payload
from conftest import SMALL_REPO, TEST_API_KEY, offline_settings
from da3_serverless.api.errors import ServiceError
from da3_serverless.inference.cancel import Cancelled, CancelToken
from da3_serverless.server.batching import Batcher, BatchItem
from da3_serverless.server.queue import Job, Scheduler
from da3_serverless.service import Service
from servers import serve_process

HEADERS = {"X-API-Key": TEST_API_KEY}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """The 8 batch photos as base64 (one with an EXIF rotation)."""
    return base64_photos(tmp_path_factory.mktemp("batch-photos"))


def batch_sizes(log_path: Path) -> list[int]:
    """The sizes of the batches the server's JSON log says it formed."""
    sizes = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("msg") == "batch formed":
            sizes.append(json.loads(line)["batch"])
    return sizes


@pytest.mark.slow
def test_concurrent_clients_get_the_sequential_answers(service_env, photos, tmp_path):
    env = {**service_env, "MAX_BATCH": "8", "BATCH_WAIT_MS": "1000", "MAX_QUEUE": "16"}
    log_path = tmp_path / "serve.log"
    with serve_process(env, log_path) as (url, _):

        def post(photo: str) -> dict[str, Any]:
            response = httpx.post(
                f"{url}/runsync", json=payload(photo), headers=HEADERS, timeout=300
            )
            assert response.status_code == 200, response.text
            return response.json()

        sequential = [post(photo) for photo in photos]
        assert batch_sizes(log_path) == [1] * 8
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            concurrent_answers = list(pool.map(post, photos))
        formed = batch_sizes(log_path)[8:]
        assert sum(formed) == 8 and max(formed) > 1, formed
        for got, expected in zip(concurrent_answers, sequential, strict=True):
            assert_same_answer(got, expected)
        assert (got["width"], got["height"]) == (800, 450)
        assert (sequential[6]["width"], sequential[6]["height"]) == (1150, 647)  # EXIF: upright

        # /run jobs batch the same way.
        before = len(batch_sizes(log_path))
        jobs = [
            httpx.post(f"{url}/run", json=payload(p), headers=HEADERS, timeout=60).json()["id"]
            for p in photos[:3]
        ]
        for job_id, expected in zip(jobs, sequential, strict=False):
            assert_same_answer(poll(url, job_id), expected)
        assert max(batch_sizes(log_path)[before:]) > 1
        metrics = httpx.get(f"{url}/metrics").text
        assert "da3_queue_depth 0.0" in metrics and "da3_inflight 0.0" in metrics


def poll(url: str, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/status/{job_id}", headers=HEADERS, timeout=30).json()
        if body["status"] == "COMPLETED":
            assert body["delayTime"] >= 0 and body["executionTime"] >= 0
            return body["output"]
        assert body["status"] in ("IN_QUEUE", "IN_PROGRESS"), body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


# ---- the gatherer, in process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def service(hf_cache, tmp_path_factory) -> Service:
    workspace = tmp_path_factory.mktemp("workspace")
    settings = offline_settings(hf_cache, workspace, warmup=False)
    service = Service(settings)
    service.start()
    return service


class Recorder:
    """Around the real `Service.handle_batch`: the batch sizes it was called with, and when
    each request's batch started."""

    def __init__(self, service: Service):
        self.service = service
        self.calls: list[int] = []
        self.started: dict[str, tuple[float, int]] = {}

    def handle_batch(self, items):
        self.calls.append(len(items))
        return self.service.handle_batch(items)

    def submit(self, batcher: Batcher, name: str, photo: str) -> asyncio.Task:
        """Admit and submit one request named `name`, as the server's routes do."""
        batcher.scheduler.admit()
        loop = asyncio.get_running_loop()

        def on_start(size: int) -> None:
            self.started[name] = (loop.time(), size)

        item = BatchItem({**payload(photo), "api_key": TEST_API_KEY}, None, on_start=on_start)
        key = self.service.batch_key(self.service.authorize(item.payload))
        return asyncio.create_task(batcher.submit(key, SMALL_REPO, item))


def test_a_lone_request_waits_the_window_and_no_longer(service, photos):
    async def scenario() -> tuple[float, Recorder]:
        recorder = Recorder(service)
        batcher = Batcher(Scheduler(max_queue=8), recorder.handle_batch, 8, wait_s=0.5)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        response = await recorder.submit(batcher, "alone", photos[0])
        assert response["width"] == 1208
        return recorder.started["alone"][0] - sent, recorder

    waited, recorder = asyncio.run(scenario())
    assert recorder.calls == [1]
    assert 0.45 <= waited < 0.5 + 10  # the window, plus a generous allowance for a busy host


def test_a_full_batch_starts_without_waiting_for_the_window(service, photos):
    async def scenario() -> Recorder:
        recorder = Recorder(service)
        scheduler = Scheduler(max_queue=8)
        batcher = Batcher(scheduler, recorder.handle_batch, 3, wait_s=600)
        tasks = [recorder.submit(batcher, f"r{i}", photos[i]) for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)  # never the 600 s window
        assert scheduler.waiting == 0 and scheduler.running == 0
        return recorder

    recorder = asyncio.run(scenario())
    assert recorder.calls == [3]
    assert {size for _, size in recorder.started.values()} == {3}


def test_a_request_cancelled_while_gathered_leaves_its_batch(service, photos):
    async def scenario() -> tuple[Recorder, Scheduler, asyncio.Task, dict]:
        recorder = Recorder(service)
        scheduler = Scheduler(max_queue=8)
        batcher = Batcher(scheduler, recorder.handle_batch, 2, wait_s=600)
        gone = recorder.submit(batcher, "gone", photos[1])
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)
        assert scheduler.waiting == 0  # out of the waiting room at once
        first = recorder.submit(batcher, "first", photos[2])
        second = recorder.submit(batcher, "second", photos[3])
        # Had the cancelled one stayed, "first" would have filled the batch with it.
        answers = await asyncio.wait_for(asyncio.gather(first, second), timeout=300)
        return recorder, scheduler, gone, answers

    recorder, scheduler, gone, answers = asyncio.run(scenario())
    assert gone.cancelled() and "gone" not in recorder.started
    assert recorder.calls == [2] and scheduler.waiting == 0
    alone = service.handle({**payload(photos[2]), "api_key": TEST_API_KEY})
    assert_same_answer(answers[0], alone)


def test_the_request_budget_applies_per_batch(hf_cache, tmp_path, photos):
    """Two 126 x 70 photos (45 tokens each) fit the budget together, three do not: a batch of
    three runs as two forwards, and each request is still answered."""
    settings = offline_settings(hf_cache, tmp_path, warmup=False, request_budget_tokens=2 * 45)
    service = Service(settings)
    service.start()
    predictor = service.model_cache.get(SMALL_REPO)
    network, batches = predictor.network, []

    def logged(images, *args, **kwargs):
        batches.append(images.shape[0])
        return network(images, *args, **kwargs)

    predictor.network = logged
    try:
        items = [({**payload(photo), "api_key": TEST_API_KEY}, None, None) for photo in photos[:3]]
        answers = service.handle_batch(items)
    finally:
        predictor.network = network
    assert batches == [2, 1]
    assert all(isinstance(answer, dict) and answer["image_base64"] for answer in answers)


def test_a_job_cancelled_while_gathered_leaves_without_running(service, photos):
    async def scenario() -> tuple[Recorder, Scheduler, Job]:
        recorder = Recorder(service)
        scheduler = Scheduler(max_queue=8)
        batcher = Batcher(scheduler, recorder.handle_batch, 8, wait_s=600)
        job = Job(id="gathered")
        scheduler.admit()
        item = BatchItem({**payload(photos[0]), "api_key": TEST_API_KEY}, None, job)
        key = service.batch_key(service.authorize(item.payload))
        waiting = asyncio.create_task(batcher.submit(key, SMALL_REPO, item))
        await asyncio.sleep(0.05)
        job.request_cancel("cancelled by the test")
        with pytest.raises(Cancelled, match="cancelled by the test"):
            await asyncio.wait_for(waiting, timeout=60)  # at once, not after the window
        return recorder, scheduler, job

    recorder, scheduler, job = asyncio.run(scenario())
    assert recorder.calls == [] and scheduler.waiting == 0 and job.status == "CANCELLED"


def cancelling_at_block(service: Service, block: int, tokens: list[CancelToken]):
    """A hook that cancels `tokens` when the network reaches backbone block `block`."""
    network = service.model_cache.get(SMALL_REPO).network

    def cancel(module, args) -> None:
        for token in tokens:
            token.cancel("cancelled by the test")

    return network.backbone.pretrained.blocks[block].register_forward_pre_hook(cancel)


def test_a_request_cancelled_in_a_running_batch_stops_alone(service, photos):
    tokens = [CancelToken() for _ in range(3)]
    items = [
        ({**payload(photo), "api_key": TEST_API_KEY}, None, token)
        for photo, token in zip(photos[:3], tokens, strict=True)
    ]
    before = set(service.settings.output_dir.glob("*"))
    hook = cancelling_at_block(service, 2, tokens[1:2])
    try:
        answers = service.handle_batch(items)
    finally:
        hook.remove()
    assert isinstance(answers[1], ServiceError) and answers[1].code == "cancelled"
    written = set(service.settings.output_dir.glob("*")) - before
    # The depth PNGs of the two that finished, nothing of the cancelled one.
    assert written == {Path(answers[index]["file_path"]) for index in (0, 2)}
    for index in (0, 2):
        alone = service.handle({**payload(photos[index]), "api_key": TEST_API_KEY})
        assert_same_answer(answers[index], alone)
        service.discard(alone)


def test_a_batch_whose_requests_are_all_cancelled_stops_its_forward(service, photos):
    tokens = [CancelToken() for _ in range(2)]
    items = [
        ({**payload(photo), "api_key": TEST_API_KEY}, None, token)
        for photo, token in zip(photos[:2], tokens, strict=True)
    ]
    network = service.model_cache.get(SMALL_REPO).network
    head_ran: list[bool] = []
    hooks = [
        cancelling_at_block(service, 2, tokens),
        network.head.register_forward_pre_hook(lambda module, args: head_ran.append(True)),
    ]
    try:
        answers = service.handle_batch(items)
    finally:
        for hook in hooks:
            hook.remove()
    assert [answer.code for answer in answers] == ["cancelled", "cancelled"]
    assert not head_ran  # the shared forward stopped before the head
