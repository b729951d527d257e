"""A sequence's input through the service, before the model runs: `video_url` through the safe
download (private addresses refused unless allowed, the video byte cap), and hostile videos
answered with their documented codes, fast, with no file left behind."""

from __future__ import annotations

import base64
import contextlib
import time

import pytest

from conftest import TEST_API_KEY, offline_settings
from contract_cases import serve_directory
from da3_serverless.api.errors import ServiceError
from da3_serverless.service import Service
from videos import audio_only, constant_rate, make_video

FIELDS = {"api_key": TEST_API_KEY, "fps": 5, "chunk_size": 4, "output_metric": False,
          "process_res": 56, "outputs": ["trajectory"]}  # fmt: skip


def _service(tmp_path, **settings) -> Service:
    return Service(offline_settings(None, tmp_path / "workspace", **settings))


def _error(service: Service, payload: dict) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        service.handle({**FIELDS, **payload})
    return caught.value


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    (folder / "clip.mp4").write_bytes(make_video(constant_rate(1.0, 30)))
    (folder / "sound.mp4").write_bytes(audio_only())
    with contextlib.ExitStack() as stack:
        yield stack.enter_context(serve_directory(folder))


def test_video_url_goes_through_the_safe_download(tmp_path, clip_server):
    refused = _error(_service(tmp_path), {"video_url": f"{clip_server}/clip.mp4"})
    assert refused.code == "invalid_input" and "video_url" in refused.message
    small = _service(tmp_path, allow_private_urls=True, max_video_bytes=500)
    assert _error(small, {"video_url": f"{clip_server}/clip.mp4"}).code == "image_too_large"
    allowed = _service(tmp_path, allow_private_urls=True)
    sound = _error(allowed, {"video_url": f"{clip_server}/sound.mp4"})
    assert sound.code == "invalid_input" and "no video stream" in sound.message
    missing = _error(allowed, {"video_url": f"{clip_server}/none.mp4"})
    assert missing.code == "fetch_failed"


def test_hostile_videos_are_refused_before_the_model(tmp_path):
    service = _service(tmp_path, max_video_pixels=64 * 47, max_video_duration_s=5)
    clip = make_video(constant_rate(1.0, 30))
    long = make_video([0.0, 0.5, 6.0], width=48, height=32)
    cases = [
        (b"", "invalid_input", "video_base64: the base64 image is empty"),
        (b"\x1aE\xdf\xa3" + bytes(100), "invalid_input", "not a video"),
        (audio_only(), "invalid_input", "no video stream"),
        (clip[: len(clip) // 3], "invalid_input", "not a video"),
        (clip, "image_too_large", "MAX_VIDEO_PIXELS"),
        (long, "request_too_large", "MAX_VIDEO_DURATION_S"),
    ]
    for data, code, message in cases:
        started = time.perf_counter()
        error = _error(service, {"video_base64": base64.b64encode(data).decode()})
        assert (error.code, message in error.message) == (code, True), error
        assert time.perf_counter() - started < 5
    assert service.model_cache.loaded() == []  # refused before any model was loaded
    assert not list((service.settings.workspace_dir / "sequences").iterdir())
