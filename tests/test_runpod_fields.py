"""RunPod's request fields beside `input` on the self-hosted `/v2` paths, driven by RunPod's own
SDK (`runpod.Endpoint` pointed at the server): `policy.executionTimeout` and `ttl`, `/status`
after `/runsync` (results kept a while), `webhook` posted to a receiver on 127.0.0.1, `/retry`,
`workerId` and `delayTime`. The server runs the gated stand-in service of
`test_http_server.py`, so the tests decide how long a job runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import requests
import runpod

from da3_serverless.client import Client, DA3Error, deadline_policy
from da3_serverless.server import create_app
from servers import app_in_thread, eventually
from test_http_server import KEY, GatedService, req, settings

ENDPOINT_ID = "endpoint"


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POSTed JSON body; answers 500 to the first
    `fail_first` of them (RunPod retries those)."""

    def __init__(self, fail_first: int = 0):
        self.bodies: list[dict[str, Any]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                failing = len(receiver.bodies) <= receiver.fail_first
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?token=t"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def gated(monkeypatch) -> Iterator[tuple[GatedService, str, runpod.Endpoint]]:
    """The stand-in service behind a server whose webhooks may reach loopback (a test setting:
    DA3_ALLOW_PRIVATE_URLS) and retry fast; RunPod's SDK pointed at it."""
    service = GatedService()
    server_settings = settings(
        allow_private_urls=True, webhook_retry_delay_s=0.05, webhook_timeout_s=5, runsync_ttl_s=2
    )
    with app_in_thread(create_app(server_settings, service)) as url:
        monkeypatch.setattr(runpod, "endpoint_url_base", f"{url}/v2")
        yield service, url, runpod.Endpoint(ENDPOINT_ID, api_key=KEY)


def status(url: str, job_id: str) -> httpx.Response:
    return httpx.get(f"{url}/v2/{ENDPOINT_ID}/status/{job_id}", headers={"Authorization": KEY})


def test_execution_timeout_stops_the_job_as_timed_out(gated):
    service, url, endpoint = gated
    service.gate.clear()  # the job runs until stopped
    job = endpoint.run({"input": req("slow"), "policy": {"executionTimeout": 5000}})
    started = time.monotonic()
    assert job.output(timeout=60) is None
    assert time.monotonic() - started >= 5.0 - 0.1  # not before its timeout (poll tolerance)
    assert job.status() == "TIMED_OUT"
    body = status(url, job.job_id).json()
    assert "output" not in body and body["executionTime"] >= 5000
    error = json.loads(body["error"])
    assert error["code"] == "cancelled"  # the stand-in says where it stopped
    assert service.stopped == 1  # stopped by the cancel path, at its next check
    eventually(lambda: endpoint.health()["workers"]["idle"] == 1, 30, "the worker to be free")
    service.gate.set()
    # /retry runs it again under the same id; this time it completes.
    retried = endpoint.rp_client.post(f"{ENDPOINT_ID}/retry/{job.job_id}", None)
    assert retried["id"] == job.job_id and retried["status"] in ("IN_QUEUE", "IN_PROGRESS")
    again = runpod.endpoint.Job(ENDPOINT_ID, job.job_id, endpoint.rp_client)
    assert again.output(timeout=60)["tag"] == "slow"
    assert endpoint.health()["jobs"]["retried"] == 1
    with pytest.raises(requests.HTTPError) as completed:  # only FAILED or TIMED_OUT jobs
        endpoint.rp_client.post(f"{ENDPOINT_ID}/retry/{job.job_id}", None)
    assert completed.value.response.status_code == 400


def test_status_after_runsync_then_it_expires(gated):
    _, url, endpoint = gated
    answer = endpoint.rp_client.post(f"{ENDPOINT_ID}/runsync", {"input": req("kept")})
    assert answer["status"] == "COMPLETED"
    job = runpod.endpoint.Job(ENDPOINT_ID, answer["id"], endpoint.rp_client)
    assert job.status() == "COMPLETED" and job.output()["tag"] == "kept"
    body = status(url, answer["id"]).json()
    assert body["workerId"] and body["delayTime"] >= 0 and body["executionTime"] >= 0
    eventually(lambda: status(url, answer["id"]).status_code == 404, 30, "RUNSYNC_TTL_S to pass")
    assert "expired" in str(status(url, answer["id"]).json()["error"])


def test_delay_time_while_queued(gated):
    service, url, endpoint = gated
    service.gate.clear()
    running = endpoint.run(req("a"))
    assert service.entered.acquire(timeout=30)
    queued = endpoint.run(req("b"))
    time.sleep(0.3)
    body = status(url, queued.job_id).json()
    assert body["status"] == "IN_QUEUE" and body["delayTime"] >= 300 and "workerId" not in body
    service.gate.set()
    assert queued.output(timeout=60)["tag"] == "b" and running.output(timeout=60)["tag"] == "a"


def test_webhook_posts_the_job_object_with_retries(gated):
    _, url, endpoint = gated
    receiver = Receiver(fail_first=2)  # RunPod's three tries: two retries after failures
    job = endpoint.run({"input": req("hooked"), "webhook": receiver.url,
                        "policy": {"lowPriority": True, "ttl": 60_000}})  # fmt: skip
    assert job.output(timeout=60)["tag"] == "hooked"
    eventually(lambda: len(receiver.bodies) == 3, 30, "three webhook tries")
    assert receiver.bodies[0] == receiver.bodies[2]
    posted = receiver.bodies[2]
    assert posted["id"] == job.job_id and posted["status"] == "COMPLETED"
    assert posted["output"]["tag"] == "hooked" and posted == status(url, job.job_id).json()
    receiver.server.shutdown()


def test_webhook_to_a_denied_address_is_not_posted():
    """Without the test setting, a webhook to loopback is refused like an image URL."""
    service = GatedService()
    receiver = Receiver()
    with app_in_thread(create_app(settings(webhook_retry_delay_s=0.05), service)) as url:
        answer = httpx.post(f"{url}/v2/e/runsync", headers={"Authorization": KEY},
                            json={"input": req("x"), "webhook": receiver.url})  # fmt: skip
        assert answer.json()["status"] == "COMPLETED"
        time.sleep(0.5)  # three tries, 0.05 s apart, each refused at once
    assert receiver.bodies == []
    receiver.server.shutdown()


@pytest.mark.parametrize(
    ("fields", "wrong"),
    [
        ({"policy": {"executionTimeout": 4999}}, "policy.executionTimeout"),
        ({"policy": {"ttl": 5000}}, "policy.ttl"),
        ({"policy": {"lowPriority": "yes"}}, "lowPriority"),
        ({"policy": {"timeout": 1}}, "policy must be"),
        ({"webhook": "ftp://host/x"}, "webhook"),
        ({"s3Config": {"accessId": "a"}}, "s3Config"),
        ({"inputs": {}}, "not ['inputs']"),
    ],
)
def test_runpod_fields_refused(gated, fields, wrong):
    service, url, _ = gated
    answer = httpx.post(f"{url}/v2/{ENDPOINT_ID}/run", headers={"Authorization": KEY},
                        json={"input": req("x"), **fields})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["status"] == "FAILED"
    assert wrong in json.loads(answer.json()["error"])["message"]
    assert service.seen_keys == []


def test_our_client_sends_its_deadline_and_cancels_when_it_passes(gated):
    service, url, _ = gated
    service.gate.clear()
    client = Client(f"{url}/v2/{ENDPOINT_ID}", api_key=KEY, timeout=3, poll_interval=0.1)
    with client, pytest.raises(DA3Error) as caught:
        client.run(req("late"))
    assert caught.value.code == "timeout" and "cancelled it" in caught.value.message
    job_id = caught.value.message.split()[1]
    assert status(url, job_id).json()["status"] == "CANCELLED"
    eventually(lambda: service.stopped == 1, 30, "the job to stop")
    assert deadline_policy(3) == {"executionTimeout": 5000, "ttl": 10_000}
    assert deadline_policy(600) == {"executionTimeout": 600_000, "ttl": 600_000}
    service.gate.set()


@pytest.mark.slow
def test_ttl_ends_a_job_still_queued_as_timed_out(gated):
    """policy.ttl counts from submission, queued included (10 s is RunPod's least)."""
    service, url, endpoint = gated
    service.gate.clear()
    running = endpoint.run(req("first"))
    assert service.entered.acquire(timeout=30)
    queued = endpoint.run({"input": req("late"), "policy": {"ttl": 10_000}})
    assert queued.output(timeout=60) is None and queued.status() == "TIMED_OUT"
    body = status(url, queued.job_id).json()
    assert body["delayTime"] >= 10_000 and "workerId" not in body  # it never started
    assert endpoint.health()["jobs"]["inQueue"] == 0
    service.gate.set()
    assert running.output(timeout=60)["tag"] == "first"
    assert len(service.seen_keys) == 1  # the timed-out job never ran
