"""A video end to end through RunPod's own local API: the real worker
(`python -m da3_serverless.runpod_worker --rp_serve_api`) as a subprocess on 127.0.0.1 with
the random-weight da3-small, a synthetic clip as `video_base64`, the outputs read back (the TUM
trajectory, the depth frames' PNGs, the chunks' alignment summaries).

What runpod-python's local API (1.12, `runpod/serverless/modules/rp_fastapi.py`) offers, and
so what can be tested here:
- `/runsync` runs the job and answers it; `/run` only stores the job, and `/status/<id>` then
  runs it inside that request and answers when it is done: there is no IN_PROGRESS status to
  poll, and the local API keeps no progress.
- Progress: the worker's `progress_update` takes the SDK's real path, which POSTs
  `{"status": "IN_PROGRESS", "output": <update>}` to `RUNPOD_WEBHOOK_POST_OUTPUT` (the job-done
  URL RunPod's platform gives a worker); here that URL is a recorder on 127.0.0.1, so the
  chunk summaries the SDK sends are read back as RunPod would receive them.
- `/stream/<id>` serves generator handlers only; ours is a plain function (a generator would
  answer every request with a list, docs/ARCHITECTURE.md §8), so it answers FAILED. The
  self-hosted server's `/stream` is tested with runpod-python's `Job.stream()`
  (tests/test_sequence_client.py).
- There is no `/cancel`: a job cannot be cancelled through the local API. The worker's cancel
  of a sequence (runpod-python's own `JobScaler` cancelling the real handler's task after the
  first chunk) is tested in process in tests/test_sequence_service.py.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import TEST_API_KEY
from servers import eventually, runpod_local_api
from videos import constant_rate, make_video

pytestmark = pytest.mark.slow

FIELDS = {"fps": 5, "chunk_size": 4, "overlap": 2, "process_res": 56, "output_metric": False,
          "outputs": ["trajectory", "depth_frames"]}  # fmt: skip
CHUNKS = [(0, 4), (2, 6), (4, 8), (6, 10)]  # 10 frames (2 s at 5 a second) in chunks of 4 by 2


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Keeps each POST's `X-Request-ID` (the job id) and JSON body, as RunPod's platform would
    receive them; answers 200."""

    posts: list[tuple[str, dict]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.posts.append((self.headers.get("X-Request-ID", ""), json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def platform() -> Iterator[tuple[str, list[tuple[str, dict]]]]:
    """A recorder standing in for RunPod's job-done URL: (its URL template, the posts)."""
    posts: list[tuple[str, dict]] = []
    handler = type("Recorder", (_Recorder,), {"posts": posts})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:  # RunPod's template: the SDK puts the job id for $ID and appends "&isStream=..."
        yield f"http://127.0.0.1:{server.server_port}/job-done/$ID?gpu=test", posts
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def runpod_local(hf_cache, tmp_path_factory, platform) -> Iterator[tuple[str, Path]]:
    """The worker's local API, its progress posted to the recorder: (URL, its log)."""
    import conftest

    env = conftest.service_env.__wrapped__(hf_cache, tmp_path_factory.mktemp("worker"))
    env["RUNPOD_WEBHOOK_POST_OUTPUT"] = platform[0]
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    with runpod_local_api(env, log) as url:
        yield url, log


@pytest.fixture(scope="module")
def clip() -> str:
    return base64.b64encode(make_video(constant_rate(2.0, 30))).decode()


def _request(clip: str) -> dict:
    return {"input": {"api_key": TEST_API_KEY, "video_base64": clip, **FIELDS}}


def _progress(posts: list[tuple[str, dict]], job_id: str) -> list[dict]:
    """The chunk summaries posted for `job_id`, by chunk (each post has a thread of its own
    in the SDK, so they may arrive in any order)."""
    updates = [body for sent_for, body in posts if sent_for == job_id]
    assert all(body["status"] == "IN_PROGRESS" for body in updates), updates
    chunks = [body["output"] for body in updates if body["output"].get("stage") == "sequence"]
    return sorted(chunks, key=lambda summary: summary["chunk"])


def _check_sequence(output: dict) -> None:
    """The response of the 10-frame clip: its chunks' alignment, the TUM trajectory and the
    depth frames read back from their zips."""
    sequence = output["sequence"]
    assert sequence["frames"] == 10
    assert sequence["timestamps"] == pytest.approx([i / 5 for i in range(10)], abs=1e-3)
    chunks = sequence["chunks"]
    assert [(c["start"], c["stop"]) for c in chunks] == CHUNKS
    assert chunks[0]["scale"] == 1.0  # the first chunk is the sequence's frame
    assert all(c["scale"] > 0 and np.isfinite(c["residual"]) for c in chunks)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(output["trajectory"]["base64"]))) as tum:
        lines = tum.read("trajectory.tum").decode().splitlines()
    assert lines[0].startswith("# timestamp tx ty tz qx qy qz qw")
    poses = np.array([[float(v) for v in line.split()] for line in lines[1:]])
    assert poses.shape == (10, 8)
    np.testing.assert_allclose(poses[:, 0], sequence["timestamps"], atol=1e-6)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(output["depth_frames"]["base64"]))) as z:
        assert len([name for name in z.namelist() if name.endswith(".png")]) == 10


def test_a_video_through_runsync_with_the_sdks_progress(runpod_local, platform, clip):
    url, log = runpod_local
    answer = httpx.post(f"{url}/runsync", json=_request(clip), timeout=300).json()
    assert answer["status"] == "COMPLETED", answer.get("error")
    _check_sequence(answer["output"])
    # Each chunk's summary went through runpod-python's progress_update to the job-done URL.
    chunks = answer["output"]["sequence"]["chunks"]
    eventually(lambda: len(_progress(platform[1], answer["id"])) == len(chunks), 30, "progress")
    assert _progress(platform[1], answer["id"]) == chunks
    assert f"{answer['id']} | Sending Progress Update" in log.read_text()


def test_run_then_status_runs_the_job_in_the_status_request(runpod_local, platform, clip):
    url, _ = runpod_local
    queued = httpx.post(f"{url}/run", json=_request(clip), timeout=30).json()
    assert queued["status"] == "IN_PROGRESS" and queued["id"].startswith("test-")
    assert _progress(platform[1], queued["id"]) == []  # stored, not started
    done = httpx.post(f"{url}/status/{queued['id']}", timeout=300).json()
    assert done["status"] == "COMPLETED", done.get("error")
    _check_sequence(done["output"])
    chunks = done["output"]["sequence"]["chunks"]
    eventually(lambda: len(_progress(platform[1], queued["id"])) == len(chunks), 30, "progress")
    assert _progress(platform[1], queued["id"]) == chunks
    # The job is gone once answered: the local API keeps no result to poll again.
    again = httpx.post(f"{url}/status/{queued['id']}", timeout=30).json()
    assert again == {"id": queued["id"], "status": "FAILED", "error": "Job ID not found"}


def test_the_local_api_has_no_stream_for_a_plain_handler_and_no_cancel(runpod_local, clip):
    url, _ = runpod_local
    queued = httpx.post(f"{url}/run", json=_request(clip), timeout=30).json()
    stream = httpx.post(f"{url}/stream/{queued['id']}", timeout=30).json()
    assert stream["status"] == "FAILED"
    assert stream["error"] == "Stream not supported, handler must be a generator."
    # No route to cancel the stored (or a running) job with.
    assert httpx.post(f"{url}/cancel/{queued['id']}", timeout=30).status_code == 404
