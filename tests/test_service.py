"""The transport-free service, in process: outputs, storage, limits and error mapping, with a
real random-weight da3-small loaded through the offline HF cache."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import SMALL_REPO, TEST_API_KEY, examples, offline_settings
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import OUTPUT_NAMES, RunRequest, RunResponse
from da3_serverless.config import Settings
from da3_serverless.inference.cache import ModelCache, model_bytes
from da3_serverless.inference.predictor import Predictor
from da3_serverless.service import Service
from paths import IMAGES

RES = 140
PHOTO = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()


@pytest.fixture(scope="module")
def service(hf_cache, tmp_path_factory) -> Service:
    service = Service(offline_settings(hf_cache, tmp_path_factory.mktemp("workspace")))
    service.start()
    return service


def request(**fields) -> dict:
    return {"api_key": TEST_API_KEY, "image_base64": PHOTO, "process_res": RES, **fields}


def outputs_of(service: Service) -> list:
    return sorted(service.settings.output_dir.iterdir())


# What the random DA3-SMALL cannot give (no sky, relative depth, no 3D-Gaussian head), and the
# big or slow ones.
CANNOT = ("sky_mask", "depth_mm_png", "gaussians_ply")
SKIPPED = ("pointcloud", "scene_ply", "scene_glb", "colmap")


def test_every_output_decodes_and_the_response_fits_its_schema(service):
    outputs = [n for n in OUTPUT_NAMES if n not in CANNOT + SKIPPED]
    body = service.handle(request(outputs=outputs))
    RunResponse.model_validate(body)
    assert body["model_id"] == SMALL_REPO and body["units"] == "relative"
    assert not body["is_metric"] and body["views"] is None
    preview = Image.open(io.BytesIO(base64.b64decode(body["preview"]["base64"])))
    assert preview.mode == "RGB" and preview.size == (1208, 680)
    confidence = Image.open(io.BytesIO(base64.b64decode(body["confidence"]["base64"])))
    assert confidence.size == (1208, 680)
    depth = np.load(io.BytesIO(base64.b64decode(body["depth_npy"]["base64"])))
    assert depth.shape == (680, 1208) and depth.dtype == np.float32
    confidence = np.load(io.BytesIO(base64.b64decode(body["confidence_npy"]["base64"])))
    assert confidence.shape == (680, 1208) and confidence.dtype == np.float32
    assert body["depth_exr"]["media_type"] == "image/x-exr"
    assert set(body["timings_ms"]) >= {"decode", "inference", "encode", "save", "total"}


@pytest.mark.parametrize("output", CANNOT)
def test_an_output_the_model_cannot_give_is_refused_before_decoding(service, output):
    """The one rule for every output: refused up front, so even a broken image is not looked
    at, and the message says what to do instead."""
    with pytest.raises(ServiceError) as error:
        service.handle(request(image_base64="not an image", outputs=["depth", output]))
    assert error.value.code == "invalid_input"
    assert f"{output}: " in error.value.message and "DA3-SMALL" in error.value.message


def test_several_views_answer_per_view(service):
    photo_b = base64.b64encode((IMAGES / "soh-010.png").read_bytes()).decode()
    body = service.handle(
        {
            "api_key": TEST_API_KEY,
            "images": [{"base64": PHOTO}, {"base64": photo_b}],
            "process_res": RES,
        }
    )
    assert len(body["views"]) == 2
    assert body["image_base64"] == body["views"][0]["image_base64"]
    assert body["views"][0]["file_path"] != body["views"][1]["file_path"]


def test_one_intrinsics_matrix_serves_every_view(service):
    """One 3x3 stands for every view's camera; focal lengths may differ per view and are each
    checked against their own view."""
    k = [[1000.0, 0.0, 604.0], [0.0, 1000.0, 340.0], [0.0, 0.0, 1.0]]
    views = [{"base64": PHOTO}] * 3
    base = {"api_key": TEST_API_KEY, "images": views, "process_res": RES, "intrinsics": k}
    body = service.handle({**base, "focal_length_px": [900.0, 1000, 1100.5]})
    assert [view["intrinsics"] for view in body["views"]] == [k] * 3
    with pytest.raises(ServiceError) as error:
        service.handle({**base, "focal_length_px": [900.0, 1000, 1e6]})
    assert error.value.code == "invalid_input"
    assert error.value.message.startswith("focal_length_px[2] 1e+06 is outside")


def test_explicit_metric_request_with_a_relative_model_is_refused(service):
    with pytest.raises(ServiceError) as error:
        service.handle(request(output_metric=True))
    assert error.value.code == "invalid_input"
    assert "DA3NESTED-GIANT-LARGE-1.1" in error.value.message
    assert service.handle(request(output_metric=False))["units"] == "relative"


def test_unknown_and_unavailable_models(service):
    with pytest.raises(ServiceError) as error:
        service.handle(request(model_id="/etc/passwd"))
    assert error.value.code == "unsupported_model" and "da3-small" in error.value.message
    with pytest.raises(ServiceError) as error:
        service.handle(request(model_id="da3-base", output_metric=False))
    assert (error.value.code, error.value.status) == ("model_unavailable", 503)
    # One sentence for the caller, without the server's paths (they go to its log).
    message = error.value.message
    assert "DA3-BASE" in message and "GET /models" in message
    assert "\n" not in message and "/" not in message.replace("depth-anything/", "").replace(
        "GET /models", ""
    )
    table = {row["short_name"]: row["availability"] for row in service.model_table()}
    assert (table["da3-small"], table["da3-base"]) == ("available", "unavailable")  # offline
    online = Service(service.settings.model_copy(update={"hf_hub_offline": False}))
    assert {row["short_name"]: row["availability"] for row in online.model_table()}["da3-base"] \
        == "downloadable"  # fmt: skip


def test_large_responses_go_to_the_volume(hf_cache, tmp_path):
    service = Service(offline_settings(hf_cache, tmp_path, max_response_bytes=1000))
    body = service.handle(request(outputs=["depth", "preview"]))
    assert body["image_base64"] is None and body["preview"].get("base64") is None
    assert Image.open(body["preview"]["path"]).mode == "RGB"
    assert Image.open(body["file_path"]).size == (1208, 680)
    assert "depth, preview would pass MAX_RESPONSE_BYTES" in body["warnings"][0]


def test_what_fits_stays_inline_and_the_rest_is_stored(service):
    """A full-resolution point cloud (~12 MB) and float depth pass RunPod's cap together: the
    depth PNG stays inline, the extras that do not fit go to the volume."""
    body = service.handle(request(outputs=["pointcloud", "depth_npy"]))
    assert body["image_base64"]
    assert "base64" in body["depth_npy"] and "base64" not in body["pointcloud"]
    with open(body["pointcloud"]["path"], "rb") as ply:
        assert ply.read(36) == b"ply\nformat binary_little_endian 1.0\n"
    assert "would pass MAX_RESPONSE_BYTES" in body["warnings"][0]


def test_return_base64_false_gives_paths_only(service):
    body = service.handle(request(return_base64=False, outputs=["depth_npy"]))
    assert body["image_base64"] is None and body["depth_npy"]["path"].endswith(".npy")
    assert body["warnings"] == []


def test_unwritable_output_folder_is_reported_not_fatal(hf_cache, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "output_images").write_text("a file where the folder should be")
    service = Service(offline_settings(hf_cache, workspace))
    body = service.handle(request())
    assert body["image_base64"] and body["file_path"] is None
    assert any("could not save depth" in warning for warning in body["warnings"])


def test_a_failed_request_leaves_no_file(service, monkeypatch):
    before = outputs_of(service)
    real_save = service.store.save
    calls = []

    def save_then_break(data, suffix):
        calls.append(suffix)
        if len(calls) == 2:
            raise RuntimeError("simulated crash between two files")
        return real_save(data, suffix)

    monkeypatch.setattr(service.store, "save", save_then_break)
    with pytest.raises(RuntimeError):
        service.handle(request(return_base64=False, outputs=["depth", "preview"]))
    assert len(calls) == 2
    assert outputs_of(service) == before


def test_out_of_memory_answers_503_and_the_service_keeps_serving(service, monkeypatch):
    predictor = service.model_cache.get(SMALL_REPO)

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(predictor, "predict", no_memory)
    with pytest.raises(ServiceError) as error:
        service.handle(request())
    assert (error.value.code, error.value.status) == ("out_of_memory", 503)
    assert "process_res" in error.value.message
    monkeypatch.undo()
    assert service.handle(request())["schema_version"] == "1"


def test_auth_is_checked_before_the_request_is_read(service):
    with pytest.raises(ServiceError) as error:
        service.handle({"api_key": "wrong", "no_such_field": 1})
    assert error.value.code == "unauthorized"
    body = service.handle({**request(), "api_key": None}, api_key=TEST_API_KEY)
    assert body["schema_version"] == "1"


def test_model_cache_evicts_least_recently_used_within_its_budget(small_snapshot):
    loads = []

    def load(model_id: str) -> Predictor:
        loads.append(model_id)
        return Predictor.from_pretrained(small_snapshot, device="cpu")

    one = model_bytes(Predictor.from_pretrained(small_snapshot, device="cpu"))
    cache = ModelCache(load, budget_bytes=int(one * 2.5))
    cache.get("a"), cache.get("b"), cache.get("a")
    assert cache.loaded() == ["b", "a"] and loads == ["a", "b"]
    cache.get("c")  # over budget: "b" is the least recently used
    assert cache.loaded() == ["a", "c"]
    assert cache.evict_all_except("c") == ["a"] and cache.loaded() == ["c"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
field_names = st.sampled_from([*RunRequest.model_fields, "extra"])


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.dictionaries(field_names, json_values, max_size=6) | json_values)
def test_no_payload_raises_anything_but_service_errors(service, payload):
    if isinstance(payload, dict):
        payload = {**payload, "api_key": TEST_API_KEY}
    try:
        body = service.handle(payload)
    except ServiceError as error:
        assert error.message and "Traceback" not in error.message
        json.dumps(error.to_dict())
    else:
        json.dumps(body)


def test_the_default_model_loads_once_under_any_of_its_names(small_snapshot):
    loads = []

    def load(model_id: str) -> Predictor:
        loads.append(model_id)
        return Predictor.from_pretrained(small_snapshot, device="cpu")

    cache = ModelCache(load, budget_bytes=10**12)
    first = cache.get("da3-small")
    assert cache.get(SMALL_REPO) is first and cache.get("DA3-SMALL") is first
    assert loads == [SMALL_REPO]


def test_a_corrupt_snapshot_is_model_unavailable(hf_cache, tmp_path, small_snapshot):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((small_snapshot / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(
        (small_snapshot / "model.safetensors").read_bytes()[:100_000]  # truncated download
    )
    service = Service(offline_settings(hf_cache, tmp_path / "ws", model_id=str(broken)))
    with pytest.raises(ServiceError) as error:
        service.handle(request())
    assert (error.value.code, error.value.status) == ("model_unavailable", 503)
    assert "cannot be read as safetensors" in error.value.message


def test_multi_view_responses_count_the_repeated_first_view(service):
    """The top level repeats view 0, so its payloads count twice against the budget."""
    from da3_serverless.api.outputs import Artifact
    from da3_serverless.api.placement import fit_inline

    artifacts = [Artifact(view, "depth", b"x" * 3000, ".png", "image/png") for view in (0, 1)]
    assert len(fit_inline(artifacts, budget=8000)) == 2
    assert len(fit_inline(artifacts, budget=8000, repeated_view=0)) == 1
    assert len(fit_inline(artifacts, budget=12000, repeated_view=0)) == 2


def test_outputs_stored_nowhere_go_inline_within_the_budget(hf_cache, tmp_path):
    """Paths asked for, but the volume is unusable and there is no bucket: the depth map and
    the extras go inline after all, within MAX_RESPONSE_BYTES; past it the request fails
    (`request_too_large`, naming what to set) rather than answer without them."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "output_images").write_text("a file where the folder should be")
    service = Service(offline_settings(hf_cache, workspace))
    body = service.handle(request(return_base64=False, outputs=["depth", "depth_npy"]))
    assert body["image_base64"] and body["file_path"] is None
    assert np.load(io.BytesIO(base64.b64decode(body["depth_npy"]["base64"]))).shape == (
        body["height"], body["width"],
    )  # fmt: skip
    assert "depth could not be stored, so it is inline" in body["warnings"]
    assert "depth_npy could not be stored, so it is inline" in body["warnings"]
    budget = len(body["image_base64"]) + 1000  # the depth PNG fits, the float map does not
    assert len(body["depth_npy"]["base64"]) > 2000
    small = Service(offline_settings(hf_cache, workspace, max_response_bytes=budget))
    with pytest.raises(ServiceError) as error:
        small.handle(request(return_base64=False, outputs=["depth", "depth_npy"]))
    assert error.value.code == "request_too_large"
    message = error.value.message
    assert message.startswith("depth_npy could not be stored (could not save depth_npy on the")
    assert "no bucket is configured" in message and f" of {budget} bytes)" in message
    assert "writable volume (WORKSPACE" in message and "BUCKET_ENDPOINT_URL" in message
    assert (workspace / "output_images").read_text() == "a file where the folder should be"


def test_process_res_limit_cannot_pass_the_predictors_ceiling():
    from pydantic import ValidationError

    from da3_serverless.inference.preprocess import MAX_PROCESS_RES

    assert Settings().max_process_res == MAX_PROCESS_RES
    with pytest.raises(ValidationError):
        Settings(max_process_res=MAX_PROCESS_RES + 14)
