"""A job's progress (downloading, decoding, forward block k of n, encoding, uploading) with the
real service (random-weight da3-small): sent by the RunPod worker with the SDK's
`progress_update` (observed by a receiver standing in for RunPod's job-done URL, through the
SDK's own `JobScaler` as in `test_batch_runpod.py`), and shown by the self-hosted `/status` as
the job's `output` while it is IN_PROGRESS, rising; our client's progress callback sees it and
never takes it for the result. The worker job also carries an `s3Config`: its outputs land in
that bucket (moto's S3) under `<day>/<job id>/`."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import threading
import time
from typing import Any

import httpx
import pytest
from runpod.serverless.modules import rp_http, rp_job, rp_scale

from conftest import TEST_API_KEY, offline_settings
from da3_serverless.api.job import STAGES
from da3_serverless.client import Client
from da3_serverless.runpod_worker import worker_config
from da3_serverless.server import create_app
from da3_serverless.service import Service
from paths import IMAGES
from servers import app_in_thread, eventually
from test_runpod_fields import Receiver

PHOTO = str(IMAGES / "soh-000.png")


@pytest.fixture(scope="module")
def service(hf_cache, tmp_path_factory) -> Service:
    settings = offline_settings(hf_cache, tmp_path_factory.mktemp("workspace"), warmup=False)
    service = Service(settings)
    service.start()
    return service


def photo() -> str:
    with open(PHOTO, "rb") as file:
        return base64.b64encode(file.read()).decode()


def in_stage_order(updates: list[dict[str, Any]]) -> bool:
    order = list(STAGES)
    ranks = [order.index(update["stage"]) for update in updates]
    return ranks == sorted(ranks)


def test_worker_sends_progress_and_uses_the_jobs_s3_config(service, s3_endpoint, monkeypatch):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="k",
                      aws_secret_access_key="s", region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="jobs")
    receiver = Receiver()  # RunPod's job-done URL: where progress_update posts
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", receiver.url.split("?")[0] + "?id=$ID")
    assert rp_scale.IS_LOCAL_TEST  # the SDK honours the overrides only in local tests
    config = worker_config(service)
    data = photo()
    job = {
        "id": "job-7",
        "input": {"image_base64": data, "process_res": 280, "api_key": TEST_API_KEY,
                  "outputs": ["depth", "depth_npy"], "return_base64": False},
        "s3Config": {"accessId": "k", "accessSecret": "s", "bucketName": "jobs",
                     "endpointUrl": s3_endpoint},
    }  # fmt: skip
    results: dict[str, Any] = {}

    async def jobs_fetcher(session, jobs_needed: int) -> list[dict]:
        if results or getattr(jobs_fetcher, "given", False):
            await asyncio.sleep(0.05)
            return []
        jobs_fetcher.given = True  # type: ignore[attr-defined]
        return [job]

    async def jobs_handler(session, config: dict, job: dict) -> None:
        results[job["id"]] = await rp_job.run_job(config["handler"], job)
        scaler.kill_worker()

    scaler = rp_scale.JobScaler({**config, "jobs_fetcher": jobs_fetcher,
                                 "jobs_handler": jobs_handler})  # fmt: skip
    asyncio.run(asyncio.wait_for(scaler.run(), 300))
    output = results["job-7"]["output"]
    day = time.strftime("%Y-%m-%d", time.gmtime())
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="jobs")["Contents"])
    assert keys == [f"{day}/job-7/depth.png", f"{day}/job-7/depth_npy.npy"]
    assert output["file_url"].startswith(f"{s3_endpoint}/jobs/{day}/job-7/depth.png?")
    deadline = time.monotonic() + 30  # each update is posted from its own thread
    while not {"decoding", "forward", "uploading"} <= {b["output"]["stage"] for b in
                                                        receiver.bodies}:  # fmt: skip
        assert time.monotonic() < deadline, receiver.bodies
        time.sleep(0.05)
    for body in receiver.bodies:
        assert body["status"] == "IN_PROGRESS" and 0 <= body["output"]["percent"] <= 100
    forward = [b["output"] for b in receiver.bodies if b["output"]["stage"] == "forward"]
    assert any(" of " in update["message"] for update in forward)
    receiver.server.shutdown()


class HeldService(Service):
    """The real service, held before encoding until the test lets it go (`go`): what the
    test observes does not depend on how fast this machine runs the network."""

    def __init__(self, settings):
        super().__init__(settings)
        self.go = threading.Event()

    def _complete(self, intake, outcome):
        assert self.go.wait(120), "the test never let the job go on"
        return super()._complete(intake, outcome)


def poll_progress(url: str, job_id: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's /status; an IN_PROGRESS output (its progress, never a result) into `seen`."""
    body = httpx.get(f"{url}/v2/e/status/{job_id}", headers={"Authorization": TEST_API_KEY}).json()
    if body["status"] == "IN_PROGRESS" and "output" in body:
        assert set(body["output"]) == {"stage", "percent", "message"}  # not a result
        seen.append(body["output"])
    return body


def test_status_shows_progress_rising_then_the_result(service):
    held = HeldService(service.settings)
    held.model_cache = service.model_cache  # the loaded model, shared
    held.start()
    with app_in_thread(create_app(service.settings, held)) as url:
        job = httpx.post(f"{url}/v2/e/run", headers={"Authorization": TEST_API_KEY},
                         json={"input": {"images": [{"base64": photo()}] * 2,
                                         "process_res": 280}}).json()  # fmt: skip
        seen: list[dict[str, Any]] = []
        eventually(lambda: poll_progress(url, job["id"], seen) and seen
                   and seen[-1]["stage"] == "forward" and " of " in seen[-1]["message"], 120,
                   "the job's forward")  # fmt: skip
        held.go.set()
        while (body := poll_progress(url, job["id"], seen))["status"] == "IN_PROGRESS":
            time.sleep(0.01)
        assert body["status"] == "COMPLETED" and body["output"]["width"] == 1208
        percents = [update["percent"] for update in seen]
        assert percents == sorted(percents) and 20 < percents[-1] <= 100, seen
        assert in_stage_order(seen)

        held.go.clear()
        updates: list[dict[str, Any]] = []
        client = Client(f"{url}/v2/e", api_key=TEST_API_KEY, poll_interval=0.05)
        with client, concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.depth, [PHOTO] * 2, process_res=280,
                                  on_progress=updates.append)  # fmt: skip
            eventually(lambda: updates, 120, "the client's first progress update")
            held.go.set()
            result = running.result(120)
        assert result.views[0].width == 1208  # the result, never a progress object
        assert all(set(u) == {"stage", "percent", "message"} for u in updates)


def test_sdk_s3_config_on_the_self_hosted_server(service, s3_endpoint, monkeypatch):
    """RunPod's SDK against the self-hosted /v2 paths: a job's s3Config takes its outputs,
    under `<day>/<job id>/`, with no bucket configured on the server."""
    import boto3
    import runpod

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="k2",
                      aws_secret_access_key="s2", region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="sdk-jobs")
    with app_in_thread(create_app(service.settings, service)) as url:
        monkeypatch.setattr(runpod, "endpoint_url_base", f"{url}/v2")
        endpoint = runpod.Endpoint("e", api_key=TEST_API_KEY)
        job = endpoint.run({
            "input": {"image_base64": photo(), "process_res": 140, "return_base64": False,
                      "outputs": ["depth", "preview"]},
            "s3Config": {"accessId": "k2", "accessSecret": "s2", "bucketName": "sdk-jobs",
                         "endpointUrl": s3_endpoint},
        })  # fmt: skip
        output = job.output(timeout=300)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="sdk-jobs")["Contents"])
    assert keys == [f"{day}/{job.job_id}/depth.png", f"{day}/{job.job_id}/preview.png"]
    assert httpx.get(output["preview"]["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"
