"""`da3-serverless batch` and `Client.map`: datasets fanned out to an endpoint.

Real HTTP throughout: a self-hosted server (`da3-serverless serve`, random-weight da3-small)
on 127.0.0.1, reached directly or through `Relay`, a small local HTTP server in front of it
that counts the requests, can answer a storm of 429s and 5xx first, and can hold requests back
(so a batch is killed at a known point)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import zipfile
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import TEST_API_KEY
from contract_cases import serve_directory
from da3_serverless.batch import (
    RECORD_NAME,
    BatchItem,
    items_from,
    read_record,
    retryable,
    run_batch,
)
from da3_serverless.cli import main
from da3_serverless.client import Client, DA3Error
from paths import IMAGES, REPO
from servers import eventually, serve_command, serve_process

RES = 28  # the smallest network input that keeps a 64 x 48 photo's shape (2 x 2 patches)
PHOTOS = 40
PHOTO_FILES = ("depth.png", "preview.png", "json")


class Relay:
    """A local HTTP server forwarding to `upstream`. It answers the first POSTs to
    `/runsync` with `storm` (statuses, in order) instead of forwarding them, and holds every
    POST after the first `hold_after` until `release` is set (then forwards it). With
    `queue_at` (RunPod's paths on the server, `/v2/<id>`), `/runsync` goes to its `/run`,
    which answers `IN_QUEUE` at once, and `/status/<job>` to its `/status/<job>`. `posts`
    counts the POSTs to `/runsync` it received, `polls` the GETs of `/status`."""

    def __init__(self, upstream: str, storm: list[int] = (), hold_after: int | None = None,
                 queue_at: str | None = None):  # fmt: skip
        self.upstream = upstream
        self.storm = list(storm)
        self.hold_after = hold_after
        self.queue_at = queue_at
        self.release = threading.Event()
        self.posts = 0
        self.polls = 0
        self.answered = 0
        self.lock = threading.Lock()

    def __enter__(self) -> str:
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                relay.forward(self, "POST")

            def do_GET(self) -> None:
                relay.forward(self, "GET")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def forward(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        body = handler.rfile.read(int(handler.headers.get("content-length") or 0))
        counted = method == "POST" and handler.path.startswith("/runsync")
        with self.lock:
            self.posts += counted
            self.polls += handler.path.startswith("/status/")
            storm = self.storm.pop(0) if counted and self.storm else None
            held = (counted and storm is None and self.hold_after is not None
                    and self.answered >= self.hold_after)  # fmt: skip
            self.answered += counted and storm is None and not held
        if storm is not None:
            return self.answer(handler, storm, b"<html>busy</html>", "text/html")
        if held:
            self.release.wait(60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() in
                   ("content-type", "x-api-key", "authorization")}  # fmt: skip
        path = handler.path
        if self.queue_at is not None:
            path = self.queue_at + ("/run" if counted else path)
        reply = httpx.request(method, self.upstream + path, content=body, headers=headers,
                              timeout=120)  # fmt: skip
        return self.answer(handler, reply.status_code, reply.content, "application/json")

    @staticmethod
    def answer(handler, status: int, body: bytes, kind: str) -> None:
        handler.send_response(status)
        handler.send_header("content-type", kind)
        handler.send_header("content-length", str(len(body)))
        handler.send_header("retry-after", "0")
        handler.end_headers()
        handler.wfile.write(body)


def write_photos(folder: Path, count: int) -> list[str]:
    """`count` different 64 x 48 crops of the test photos; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(IMAGES / name).convert("RGB") for name in ("soh-000.png", "soh-010.png")]
    names = []
    for index in range(count):
        x, y = 37 * index % 1100, 13 * index % 600
        crop = sources[index % 2].crop((x, y, x + 64, y + 48))
        crop.save(folder / f"p{index:02d}.png")
        names.append(f"p{index:02d}")
    return names


def assert_photo_outputs(out: Path, names: list[str]) -> None:
    """Exactly one folder per name, holding exactly its files, and nothing half-written."""
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(names)
    for name in names:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == sorted(f"{name}.{suffix}" for suffix in PHOTO_FILES)
        with Image.open(out / name / f"{name}.depth.png") as depth:
            assert depth.size == (64, 48) and depth.mode.startswith("I")
        assert json.loads((out / name / f"{name}.json").read_text())["width"] == 64


@pytest.fixture(scope="module")
def server(hf_cache, tmp_path_factory):
    import conftest

    env = conftest.service_env.__wrapped__(hf_cache, tmp_path_factory.mktemp("batch"))
    with serve_process(env, tmp_path_factory.mktemp("serve") / "serve.log") as (url, _):
        yield url


def batch_argv(source: Path, out: Path, endpoint: str, *extra: str) -> list[str]:
    return ["batch", str(source), "--out", str(out), "--endpoint", endpoint, "--api-key",
            TEST_API_KEY, "--process-res", str(RES), "--relative", *extra]  # fmt: skip


@pytest.mark.slow
def test_killed_halfway_then_rerun_sends_only_what_is_missing(server, tmp_path):
    names = write_photos(tmp_path / "photos", PHOTOS)
    out = tmp_path / "out"
    finished_before_kill = 12
    with Relay(server, hold_after=finished_before_kill) as relay_url:
        argv = batch_argv(tmp_path / "photos", out, relay_url, "--concurrency", "3")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DA3_")}
        with open(tmp_path / "batch.log", "wb") as log:
            process = subprocess.Popen(serve_command(*argv), cwd=REPO, stderr=log,
                                       env={**env, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
        done = lambda: [p for p in out.glob("p*") if p.is_dir()]  # noqa: E731
        eventually(lambda: len(done()) == finished_before_kill, 120, "the first outputs")
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    assert len(done()) == finished_before_kill  # the held requests never finished

    relay_rerun = Relay(server)
    with relay_rerun as relay_url:
        assert main(batch_argv(tmp_path / "photos", out, relay_url, "--concurrency", "4")) == 0
    assert relay_rerun.posts == PHOTOS - finished_before_kill
    assert_photo_outputs(out, names)
    successes = Counter(entry["name"] for entry in read_record(out) if entry["ok"])
    assert successes == Counter(names)  # each recorded done once, across both runs

    with Relay(server) as relay_url:  # a third run has nothing left to send
        assert main(batch_argv(tmp_path / "photos", out, relay_url)) == 0


def _ctrl_c_as_in_a_terminal() -> None:
    """The batch's Ctrl-C as a terminal delivers it: SIGINT at its default disposition, which
    Python turns into KeyboardInterrupt. A test run started in the background by a shell
    without job control (`make test &`, nohup) inherits SIGINT ignored, and Python then
    installs no handler, so the signal would be lost: the failure this test once had."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_finishes_the_requests_in_flight_and_sends_nothing_more(server, tmp_path):
    names = write_photos(tmp_path / "photos", 10)
    out = tmp_path / "out"
    relay = Relay(server, hold_after=3)
    with relay as relay_url, open(tmp_path / "batch.log", "wb") as log:
        argv = batch_argv(tmp_path / "photos", out, relay_url, "--concurrency", "2")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DA3_")}
        process = subprocess.Popen(serve_command(*argv), cwd=REPO, stderr=log,
                                   env={**env, "PYTHONPATH": str(REPO / "src")},
                                   preexec_fn=_ctrl_c_as_in_a_terminal)  # fmt: skip
        eventually(lambda: relay.posts == 5, 120, "two requests held in flight")
        process.send_signal(signal.SIGINT)
        stopping = lambda: b"stopping" in (tmp_path / "batch.log").read_bytes()  # noqa: E731
        eventually(stopping, 60, "the batch to see Ctrl-C")
        relay.release.set()  # the two in flight now finish
        assert process.wait(60) == 130
    summary = (tmp_path / "batch.log").read_text()
    assert "10 item(s): 0 done before, 5 done now, 0 failed, 5 left" in summary
    assert relay.posts == 5
    assert len([entry for entry in read_record(out) if entry["ok"]]) == 5

    assert main(batch_argv(tmp_path / "photos", out, server)) == 0
    assert_photo_outputs(out, names)


@pytest.mark.slow
def test_a_storm_of_429_and_5xx_is_retried(server, tmp_path):
    names = write_photos(tmp_path / "photos", 8)
    storm = [429] * 9 + [502, 503, 500]
    relay = Relay(server, storm=storm)
    options = {"outputs": ["depth", "preview"], "process_res": RES, "output_metric": False}
    with relay as relay_url, Client(relay_url, api_key=TEST_API_KEY, max_retries=1) as client:
        # Client.map with a short backoff (its default starts at 1 s)
        report = run_batch(client, tmp_path / "photos", tmp_path / "out", options=options,
                           concurrency=4, retries=8, backoff_base_s=0.05)  # fmt: skip
    assert report.failures == [] and sorted(report.done) == names
    assert relay.storm == [] and relay.posts == len(storm) + len(names)
    assert_photo_outputs(tmp_path / "out", names)
    attempts = {entry["name"]: entry["attempts"] for entry in read_record(tmp_path / "out")}
    assert sum(attempts.values()) > len(names)  # some items were sent again


@pytest.mark.slow
def test_jobs_answered_in_queue_are_polled(server, tmp_path):
    names = write_photos(tmp_path / "photos", 6)
    relay = Relay(server, queue_at="/v2/any-endpoint")
    with relay as relay_url, Client(relay_url, api_key=TEST_API_KEY, runpod_api_key=TEST_API_KEY,
                                    poll_interval=0.05) as client:  # fmt: skip
        report = client.map(tmp_path / "photos", tmp_path / "out", concurrency=3,
                            outputs=["depth", "preview"], process_res=RES,
                            output_metric=False)  # fmt: skip
    assert report.failures == [] and sorted(report.done) == names
    assert relay.posts == len(names) and relay.polls >= len(names)  # each job polled
    assert_photo_outputs(tmp_path / "out", names)


@pytest.mark.slow
def test_failures_are_listed_with_their_codes_and_resent_by_a_rerun(server, tmp_path, capsys):
    names = write_photos(tmp_path / "photos", 3)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a photo at all")
    out = tmp_path / "out"
    assert main(batch_argv(tmp_path / "photos", out, server)) == 1
    err = capsys.readouterr().err
    assert "4 item(s): 0 done before, 3 done now, 1 failed, 0 left" in err
    assert "failed broken: invalid_input (400)" in err
    assert "failures by code: invalid_input x1" in err
    assert_photo_outputs(out, names)
    [failure] = [entry for entry in read_record(out) if not entry["ok"]]
    assert (failure["name"], failure["code"], failure["status"]) == ("broken", "invalid_input", 400)
    assert failure["attempts"] == 1  # a refused request is not resent

    relay = Relay(server)
    with relay as relay_url:
        assert main(batch_argv(tmp_path / "photos", out, relay_url)) == 1
    assert relay.posts == 1  # only the failed item was sent again
    assert "3 done before, 0 done now, 1 failed" in capsys.readouterr().err


@pytest.mark.slow
def test_scene_folders_photos_and_a_manifest(server, tmp_path):
    source = tmp_path / "dataset"
    write_photos(source / "garden", 2)
    write_photos(source / "kitchen", 3)
    write_photos(source, 1)  # a photo beside the scene folders: its own request
    out = tmp_path / "out"
    assert main(batch_argv(source, out, server, "--max-points", "500")) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["garden", "kitchen", "p00"]
    kitchen = sorted(p.name for p in (out / "kitchen").iterdir())
    assert kitchen == sorted(
        ["kitchen.glb", "kitchen.scene.ply", "kitchen.colmap.zip", "kitchen.json"]
        + [f"kitchen.view{i}.{suffix}" for i in range(3) for suffix in ("depth.png", "preview.png")]
    )  # fmt: skip
    with zipfile.ZipFile(out / "kitchen" / "kitchen.colmap.zip") as colmap:
        assert any(name.endswith("images.bin") for name in colmap.namelist())
    assert len(json.loads((out / "garden" / "garden.json").read_text())["views"]) == 2

    photos = tmp_path / "photos"
    write_photos(photos, 2)
    manifest = tmp_path / "requests.jsonl"
    with serve_directory(photos) as photo_url:
        lines = [
            {"name": "first", "image": "photos/p00.png", "outputs": ["depth", "depth_npy"]},
            {"image": str(photos / "p01.png")},
            {"name": "pair", "images": ["photos/p00.png", "photos/p01.png"]},
            {"name": "by-url", "image_url": f"{photo_url}/p01.png"},
        ]
        manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
        assert main(batch_argv(manifest, tmp_path / "from-manifest", server)) == 0
    done = tmp_path / "from-manifest"
    assert sorted(p.name for p in done.iterdir() if p.is_dir()) == ["by-url", "first", "p01",
                                                                   "pair"]  # fmt: skip
    assert sorted(p.name for p in (done / "first").iterdir()) == [
        "first.depth.npy", "first.depth.png", "first.json"]  # fmt: skip
    assert (done / "pair" / "pair.glb").is_file() and (
        done / "by-url" / "by-url.preview.png"
    ).is_file()


def test_sources_are_checked_before_anything_is_sent(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="a video is one job, not a batch"):
        items_from(tmp_path / "clip.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no photos"):
        items_from(tmp_path / "empty")
    write_photos(tmp_path / "twice", 1)
    Image.new("RGB", (8, 8)).save(tmp_path / "twice" / "p00.jpg")
    with pytest.raises(ValueError, match=r"more than one item .*\['p00'\]"):
        items_from(tmp_path / "twice")
    manifest = tmp_path / "m.jsonl"
    for line, message in (('{"name": "../up", "image": "a.png"}', "cannot be a folder name"),
                          ('["a.png"]', "m.jsonl:1: a line is a JSON object"),
                          ("{not json", "m.jsonl:1: not JSON")):  # fmt: skip
        manifest.write_text(line)
        with pytest.raises(ValueError, match=message):
            items_from(manifest)
    manifest.write_text('{"image": "a/b.png"}\n\n{"images": ["c.png", "d.png"], "process_res": 70}')
    assert items_from(manifest) == [
        BatchItem("b", (str(tmp_path / "a" / "b.png"),)),
        BatchItem(
            "line-3", (str(tmp_path / "c.png"), str(tmp_path / "d.png")), {"process_res": 70}
        ),
    ]
    assert main(["batch", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "o"),
                 "--endpoint", "http://127.0.0.1:9"]) == 2  # fmt: skip


def test_what_is_retried():
    transient = [("overloaded", 503), ("out_of_memory", 503), ("http_error", 429),
                 ("http_error", 502), ("internal_error", 500),
                 ("connection_failed", None)]  # fmt: skip
    for code, status in transient:
        assert retryable(DA3Error(code, status, "")), code
    final = [("invalid_input", 400), ("unauthorized", 401), ("timeout", None),
             ("cancelled", 499), ("model_unavailable", 503), ("runpod_failed", None)]  # fmt: skip
    for code, status in final:
        assert not retryable(DA3Error(code, status, "")), code


def test_a_stopped_batch_sends_nothing_more(tmp_path):
    write_photos(tmp_path / "photos", 3)
    stop = threading.Event()
    stop.set()
    with Client("http://127.0.0.1:9") as client:  # nothing listens there: nothing is sent
        report = run_batch(client, tmp_path / "photos", tmp_path / "out", stop=stop)
    assert (report.total, report.left, report.done, report.failures) == (3, 3, [], [])
    assert "3 item(s) not sent: run the same command again" in report.summary()
    assert read_record(tmp_path / "out") == [] and (tmp_path / "out" / RECORD_NAME).exists()
