"""End to end through RunPod's own local API server (`--rp_serve_api`), run as a subprocess on
127.0.0.1 with a random-weight da3-small snapshot in a temporary HF cache, offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import contract_cases as cases
from da3_serverless.inference.predictor import Predictor
from paths import IMAGES, REPO
from servers import runpod_local_api

pytestmark = pytest.mark.slow


def runsync_call(url: str) -> cases.Call:
    def call(payload: dict, headers: dict | None) -> tuple[int | None, dict]:
        response = httpx.post(f"{url}/runsync", json={"input": payload}, timeout=300)
        return cases.from_runpod_job(response.json(), response.status_code)

    return call


@pytest.fixture(scope="module")
def module_env(hf_cache, tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DA3_", "HF_", "RUNPOD"))}
    workspace = tmp_path_factory.mktemp("workspace")
    env.update(
        HF_HOME=str(hf_cache), HF_HUB_OFFLINE="1", WORKSPACE=str(workspace),
        RUNPOD_VOLUME=str(workspace / "no-volume"), MODEL_ID="depth-anything/DA3-SMALL",
        DA3_API_KEY="worker-test-key-0123", DA3_DEVICE="cpu",
    )  # fmt: skip
    return env


@pytest.fixture(scope="module")
def context(small_snapshot) -> Iterator[cases.Context]:
    predictor = Predictor.from_pretrained(small_snapshot, device="cpu")

    def reference_depth(name: str, process_res: int):
        return predictor.predict(IMAGES / name, process_res=process_res).depth[0]

    with cases.serve_directory(IMAGES) as images_url:
        yield cases.Context(
            images_dir=IMAGES,
            image_url=lambda name: f"{images_url}/{name}",
            api_key="worker-test-key-0123",
            reference_depth=reference_depth,
        )


@pytest.fixture(scope="module")
def worker_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs") / "worker.log"


@pytest.fixture(scope="module")
def worker(module_env, worker_log) -> Iterator[str]:
    """Private image URLs allowed: the images come from a server on 127.0.0.1."""
    with runpod_local_api({**module_env, "DA3_ALLOW_PRIVATE_URLS": "1"}, worker_log) as url:
        yield url


@pytest.fixture(scope="module")
def strict_worker(module_env, tmp_path_factory) -> Iterator[str]:
    """Private addresses refused (the default)."""
    log = tmp_path_factory.mktemp("logs") / "strict-worker.log"
    with runpod_local_api(module_env, log) as url:
        yield url


def test_runsync_base64(worker, context, module_env, worker_log):
    body = cases.case_base64(runsync_call(worker), context)
    saved = Path(body["file_path"])
    assert saved.is_file() and saved.suffix == ".png"
    assert saved.parent == Path(module_env["WORKSPACE"]) / "output_images"
    # RunPod's SDK logs the handler's output at DEBUG (its default level): no base64 in it.
    log = worker_log.read_text()
    assert "Handler output" in log and "base64 chars>" in log
    assert not re.search(r"[A-Za-z0-9+/]{200,}", log)


def test_runsync_image_url(worker, context):
    cases.case_image_url(runsync_call(worker), context)


def test_png16_matches_predictor_and_npy_is_exact(worker, context):
    cases.case_png16_and_npy(runsync_call(worker), context)


def test_bad_inputs_then_good_request(worker, context):
    cases.case_bad_inputs(runsync_call(worker), context)


def test_auth(worker, context):
    cases.case_auth(runsync_call(worker), context)


def test_ssrf_refused_without_private_addresses(strict_worker, context):
    cases.case_ssrf(runsync_call(strict_worker), context)


def test_run_then_status(worker, context):
    payload = {"api_key": context.api_key, "image_base64": context.b64("soh-000.png"),
               "process_res": cases.PROCESS_RES}  # fmt: skip
    queued = httpx.post(f"{worker}/run", json={"input": payload}, timeout=30).json()
    assert queued["status"] in ("IN_QUEUE", "IN_PROGRESS") and queued["id"]
    status = httpx.post(f"{worker}/status/{queued['id']}", timeout=300).json()
    assert status["status"] == "COMPLETED", status
    assert status["output"]["schema_version"] == "1"


def test_error_is_json_text_runpod_marks_failed(worker, context):
    answer = httpx.post(f"{worker}/runsync", json={"input": {"api_key": "nope"}}, timeout=60)
    job = answer.json()
    assert job["status"] == "FAILED"
    assert isinstance(job["error"], str)
    assert json.loads(job["error"])["code"] == "unauthorized"


def test_test_input_json_runs_out_of_the_box(module_env, tmp_path):
    """`python -m da3_serverless.runpod_worker` with the repo's test_input.json completes."""
    env = {**module_env, "PYTHONPATH": str(REPO / "src"), "DA3_ALLOW_UNAUTHENTICATED": "1"}
    env.pop("DA3_API_KEY")
    done = subprocess.run(
        [sys.executable, "-m", "da3_serverless.runpod_worker"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "completed successfully" in output, output[-4000:]
