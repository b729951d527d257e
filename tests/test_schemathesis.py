"""Property-based API test: schemathesis generates requests from the server's own
`/openapi.json` (valid and invalid ones) and checks that none makes it answer 500, that every
answer matches the status codes, content types and schemas the document declares, that invalid
data is refused with a 4xx and that valid data is accepted (`positive_data_acceptance`).

Runs in-process (ASGI) against the real service with a random-weight da3-small and an API key,
which every generated request carries (so it reaches validation); schemathesis's own auth
check sends some without it and expects 401, as the document's securitySchemes say.

The document publishes this server's limits (`process_res`, `max_points`, `max_frames` maxima).
Schema-valid is still not service-valid: what a JSON Schema cannot say about the data, the positive
generator learns from `service_valid` (a `map_body` hook on the positive run only), and only
that: the image sources carry a real small PNG (base64, or a URL of a local image server on
127.0.0.1; videos and zips of frames become the same image, as their decoding has its own
tests: tests/test_video_input.py, tests/test_frames_zip.py), at most 3
views, cameras are plausible (a pinhole
K, identity poses) and focal lengths positive, no `model_id` other than the loaded one, no
anchors (tests/test_anchors.py), a sequence keeps its own rules (its outputs, overlap below
chunk_size, end_s after start_s), and what da3-small cannot give is not asked: `outputs` drops
what the service's one rule (`unavailable_outputs`) refuses for it, and an explicit
`output_metric: true` becomes false (it gives relative depth only). Every other field stays
as generated.
"""

from __future__ import annotations

import base64
import io
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from conftest import TEST_API_KEY
from da3_serverless.api.outputs import unavailable_outputs
from da3_serverless.api.schema import SCENE_OUTPUTS, SEQUENCE_OUTPUTS, SOURCES, RunRequest
from da3_serverless.config import Settings
from da3_serverless.inference.catalog import lookup_model
from da3_serverless.server import create_app
from da3_serverless.service import Service

EXAMPLES = 25  # per operation and mode
MAX_PROCESS_RES = 140
MODEL_ID = "depth-anything/DA3-SMALL"
# Invalid data must be rejected with a 4xx. 413 counts: the server refuses bodies nested too
# deeply or too rich in JSON structure before parsing them (a generated invalid body can be
# either).
# Either key form of the document's securitySchemes, which schemathesis fills in.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 404, 413]}},
        "auth": {
            "openapi": {
                "bearerAuth": {"bearer": TEST_API_KEY},
                "apiKeyHeader": {"api_key": TEST_API_KEY},
            }
        },
    }
)
SEQUENCE_ONLY = ("fps", "max_frames", "start_s", "end_s", "chunk_size", "overlap")


def _tiny_png() -> bytes:
    image = Image.open(Path(__file__).parent / "data" / "images" / "soh-000.png").convert("RGB")
    image.thumbnail((48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_url(tmp_path_factory):
    """A URL of a small real PNG, served over HTTP on 127.0.0.1."""
    root = tmp_path_factory.mktemp("images")
    (root / "view.png").write_bytes(_tiny_png())
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/view.png"
    server.shutdown()
    server.server_close()


def _camera(request: dict[str, Any], views: int) -> None:
    """Plausible cameras: a pinhole K for the 48-px image, identity world-to-camera poses."""
    k = [[40.0, 0.0, 24.0], [0.0, 40.0, 18.0], [0.0, 0.0, 1.0]]
    if request.get("intrinsics") is not None:
        request["intrinsics"] = k if views == 1 else [k] * views
    if request.get("extrinsics") is not None:
        pose = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
        request["extrinsics"] = [pose] * views
    focal = request.get("focal_length_px")
    if focal is not None:
        request["focal_length_px"] = 40.0 if not isinstance(focal, list) else [40.0] * views


def service_valid(request: dict[str, Any], url: str, b64: str) -> dict[str, Any]:
    """The generated (schema-valid) request made service-valid, changing only what the schema
    cannot say (see the module docstring)."""
    request = dict(request)
    source = next(key for key in SOURCES if request.get(key) is not None)
    images = request.get("images")
    for key in SOURCES:
        request.pop(key, None)
    if source == "images":
        refs = [{"url": url} if ref.get("url") is not None else {"base64": b64} for ref in images]
        request["images"] = refs[:3]
    else:
        request["image_url" if source.endswith("url") else "image_base64"] = (
            url if source.endswith("url") else b64
        )
    views = len(request.get("images") or [None])
    request.pop("model_id", None)
    request.pop("anchors", None)
    _camera(request, views)
    sequence = request.get("sequence") is True and "images" in request
    if request.get("sequence") is True and not sequence:
        request["sequence"] = False  # "sequence": true goes with images (a video is one)
    outputs = request.get("outputs")  # left out, the service's default stays
    if sequence:
        request.pop("extrinsics", None)
        if isinstance(request.get("focal_length_px"), list):
            request["focal_length_px"] = 40.0
        if request.get("intrinsics") is not None and views > 1:
            request["intrinsics"] = request["intrinsics"][0]
        keep = (*SEQUENCE_OUTPUTS, *SCENE_OUTPUTS)
        outputs = outputs and ([o for o in outputs if o in keep] or ["trajectory"])
        if None not in (request.get("chunk_size"), request.get("overlap")):
            request["overlap"] = min(request["overlap"], request["chunk_size"] - 1)
        if request.get("end_s") is not None:
            request["end_s"] = request.get("start_s", 0.0) + request["end_s"]
    else:
        outputs = outputs and ([o for o in outputs if o not in SEQUENCE_OUTPUTS] or ["depth"])
    if outputs is None:
        request.pop("outputs", None)
    else:
        request["outputs"] = outputs
    if request.get("output_metric") is True and not INFO.can_give_meters:
        request["output_metric"] = False  # an explicit true needs a model that gives meters
    parsed = RunRequest.model_validate(request)
    unavailable = {reason.split(":")[0] for reason in unavailable_outputs(parsed, INFO)}
    if unavailable:
        request["outputs"] = [o for o in parsed.outputs if o not in unavailable] or ["depth"]
    return request


INFO = lookup_model(MODEL_ID)


@pytest.fixture(scope="module")
def app(hf_cache, tmp_path_factory):
    """Valid `/run` jobs now queue real work: the queue holds every example's job (a full
    queue answers 503, which is not what this test is about)."""
    config = Settings(
        model_id=MODEL_ID, hf_home=hf_cache, hf_hub_offline=True,
        workspace=tmp_path_factory.mktemp("workspace"), device="cpu", api_key=TEST_API_KEY,
        warmup=False, max_process_res=MAX_PROCESS_RES, download_timeout_s=5.0,
        max_body_bytes=2_000_000, allow_private_urls=True, max_queue=4 * EXAMPLES,
    )  # fmt: skip
    service = Service(config)
    service.start()
    return create_app(config, service)


def _schema(app, mode: GenerationMode, url: str):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    if mode == GenerationMode.POSITIVE:
        b64 = base64.b64encode(_tiny_png()).decode()

        @schema.hook
        def map_body(context, body):
            if isinstance(body, dict) and isinstance(body.get("input"), dict):
                if any(body["input"].get(k) is not None for k in SOURCES):
                    return {**body, "input": service_valid(body["input"], url, b64)}
                return body
            if isinstance(body, dict) and any(body.get(k) is not None for k in SOURCES):
                return service_valid(body, url, b64)
            return body

    return schema


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_follows_its_own_schema(app, image_url, mode):
    schema = _schema(app, mode, image_url)
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: dict[str, set[int]] = {}
    assert {op.path for op in operations} >= {"/runsync", "/run", "/status/{job_id}", "/ready"}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not len(operation.body):
            continue  # nothing to make invalid (no body; any path string is a valid job id)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def check(case) -> None:
            response = case.call_and_validate()
            statuses.setdefault(case.operation.path, set()).add(response.status_code)

        check()
    if mode == GenerationMode.POSITIVE:  # valid requests did run, not only pass the checks
        assert 200 in statuses["/runsync"]
