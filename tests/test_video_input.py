"""Video input (api/video.py): synthetic videos made with PyAV (pans across the repository's
photos) give exact frame counts and timestamps; limits are read from the headers before any
frame is decoded; hostile videos get their documented errors."""

from __future__ import annotations

from io import BytesIO

import av
import numpy as np
import pytest

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.video import Sampling, iter_frames, open_video
from da3_serverless.config import Settings
from videos import audio_only, constant_rate, make_video, pan_frames

SETTINGS = Settings.model_construct()


def _frames(data: bytes, settings: Settings = SETTINGS, **sampling):
    video = open_video(data, Sampling(**sampling), settings)
    try:
        return list(iter_frames(video, settings))
    finally:
        video.close()


def _error(data: bytes, settings: Settings = SETTINGS, **sampling) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        _frames(data, settings, **sampling)
    return caught.value


@pytest.fixture(scope="module")
def two_seconds() -> bytes:
    return make_video(constant_rate(2.0, 30))


def test_every_frame_with_its_exact_timestamp(two_seconds):
    frames = _frames(two_seconds)
    assert len(frames) == 60
    assert [f.timestamp for f in frames] == pytest.approx([i / 30 for i in range(60)], abs=1e-3)
    assert [f.index for f in frames] == list(range(60))
    assert frames[0].image.size == (64, 48) and frames[0].image.mode == "RGB"


def test_frames_look_like_the_pan(two_seconds):
    frames = _frames(two_seconds, max_frames=3)
    truth = pan_frames(60)[:3]
    for frame, expected in zip(frames, truth, strict=True):
        error = np.abs(np.asarray(frame.image, float) - expected).mean()
        assert error < 12  # H.264 at its default quality, on 8-bit values


@pytest.mark.parametrize(
    ("sampling", "times"),
    [
        ({"fps": 5}, [i / 5 for i in range(10)]),
        ({"fps": 2, "start_s": 0.5}, [0.5, 1.0, 1.5]),
        ({"fps": 10, "start_s": 1.0, "end_s": 1.3}, [1.0, 1.1, 1.2]),
        ({"fps": 30, "max_frames": 4}, [0, 1 / 30, 2 / 30, 3 / 30]),
    ],
)
def test_sampling_by_rate_span_and_count(two_seconds, sampling, times):
    assert [f.timestamp for f in _frames(two_seconds, **sampling)] == pytest.approx(times, abs=1e-3)


def test_variable_frame_rate_keeps_its_times_and_samples_by_time():
    times = [0.0, 0.01, 0.05, 0.3, 0.31, 0.9, 1.0]
    data = make_video(times)
    assert [f.timestamp for f in _frames(data)] == pytest.approx(times, abs=1e-6)
    # At 10 frames a second: the first frame at or after each tick, never one twice.
    assert [f.timestamp for f in _frames(data, fps=10)] == pytest.approx([0.0, 0.3, 0.9, 1.0])


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_applied(rotation):
    plain = _frames(make_video(constant_rate(0.2, 30)))[0].image
    turned = _frames(make_video(constant_rate(0.2, 30), rotation=rotation))[0].image
    expected = np.rot90(np.asarray(plain), rotation // 90)  # counter-clockwise, as FFmpeg
    assert turned.size == (expected.shape[1], expected.shape[0])
    # Two encodes of the same pixels: equal up to the codec's rounding, and far from the
    # frame turned the other way.
    error = np.abs(np.asarray(turned, float) - expected).mean()
    wrong = np.abs(np.asarray(turned, float) - np.rot90(expected, 2)).mean()
    assert error < 2 < wrong


def test_webm_and_mkv_containers():
    for container in ("webm", "matroska"):
        data = make_video(constant_rate(0.5, 30), container=container, codec="libvpx-vp9")
        assert len(_frames(data)) == 15


def _limited(**limits) -> Settings:
    return Settings.model_construct(**limits)


def test_limits_from_the_headers_before_decoding(two_seconds):
    cases = [
        (_limited(max_video_bytes=1000), "request_too_large", "MAX_VIDEO_BYTES"),
        (_limited(max_video_pixels=64 * 47), "image_too_large", "MAX_VIDEO_PIXELS"),
        (_limited(max_video_duration_s=1.5), "request_too_large", "MAX_VIDEO_DURATION_S"),
        (_limited(max_video_frames=59), "request_too_large", "MAX_VIDEO_FRAMES"),
    ]
    for settings, code, name in cases:
        with pytest.raises(ServiceError) as caught:
            open_video(two_seconds, Sampling(), settings)
        assert caught.value.code == code and name in caught.value.message
    # Within the limits once the request narrows what it takes.
    assert len(_frames(two_seconds, _limited(max_video_duration_s=1.5), end_s=1.0)) == 30
    assert len(_frames(two_seconds, _limited(max_video_frames=59), fps=10)) == 20


def test_hostile_videos_get_documented_errors(two_seconds):
    damaged = bytearray(two_seconds)
    middle = len(damaged) // 2
    damaged[middle : middle + 400] = b"\xff" * 400
    cases = {
        "audio only": (audio_only(), "no video stream"),
        "empty": (b"", "not a video"),
        "not a video": (b"\x00\x00\x00\x18ftypmp42" + bytes(2000), "not a video"),
        "truncated": (two_seconds[: len(two_seconds) // 3], "not a video"),
        "damaged packets": (bytes(damaged), "truncated or damaged"),
    }
    for name, (data, message) in cases.items():
        error = _error(data)
        assert error.code == "invalid_input", name
        assert message in error.message, (name, error.message)


def test_a_span_without_frames_and_a_start_past_the_end(two_seconds):
    assert "past the end" in _error(two_seconds, start_s=5.0).message
    assert "no frame in the sampled span" in _error(two_seconds, start_s=0.51, end_s=0.52).message


def _declared_durations(data: bytes) -> tuple[object, object]:
    with av.open(BytesIO(data)) as container:
        return container.duration, container.streams.video[0].duration


def test_a_stream_without_duration_decodes_exactly():
    """Matroska written as a live stream (no seekable output): no duration in the container
    or the stream, no cues; every frame and its time still come out exactly."""
    data = make_video(constant_rate(1.0, 30), container="matroska", seekable=False)
    assert _declared_durations(data) == (None, None)
    frames = _frames(data)
    assert [f.timestamp for f in frames] == pytest.approx([i / 30 for i in range(30)], abs=1e-3)
    assert [f.index for f in frames] == list(range(30))
    sampled = _frames(data, fps=5)
    assert [f.timestamp for f in sampled] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8], abs=1e-3)


@pytest.mark.parametrize("seconds", [3.0, 12.0])
@pytest.mark.parametrize("fps", [None, 2, 0.05])
def test_a_stream_without_duration_past_the_limit_is_refused_while_decoding(seconds, fps):
    """The headers declare no duration, so opening it passes; decoding stops with the
    documented error at the first frame past MAX_VIDEO_DURATION_S, however sparse the
    sampling (a frame skipped between ticks is still decoded) and however long the stream:
    what it yields before, and so the work and memory, depend on the limit, not the stream."""
    data = make_video(constant_rate(seconds, 30), container="matroska", seekable=False)
    assert _declared_durations(data) == (None, None)
    settings = _limited(max_video_duration_s=1.0)
    video = open_video(data, Sampling(fps=fps), settings)
    taken: list[float] = []
    try:
        with pytest.raises(ServiceError) as caught:
            for frame in iter_frames(video, settings):
                taken.append(frame.timestamp)
    finally:
        video.close()
    assert caught.value.code == "request_too_large"
    assert "MAX_VIDEO_DURATION_S" in caught.value.message
    step = 1 / (fps or 30)
    assert taken == pytest.approx([i * step for i in range(int(1.0 / step + 1e-9) + 1)], abs=1e-3)


@pytest.mark.parametrize(
    ("sampling", "planned"),
    [
        ({"fps": 10}, 20),  # 2 s at 10 frames/s, from the declared duration
        ({"fps": 10, "max_frames": 500}, 20),  # max_frames past the video: the video's
        ({"fps": 10, "max_frames": 7}, 7),
    ],
)
def test_the_planned_count_comes_from_the_headers(two_seconds, sampling, planned):
    video = open_video(two_seconds, Sampling(**sampling), SETTINGS)
    try:
        assert video.frames == planned and video.frames_known
    finally:
        video.close()


@pytest.mark.parametrize("container", ["mp4", "matroska"])
def test_a_sparse_tick_on_the_last_frame_is_planned_and_taken(container):
    """A 120 frames/s video with frames from 0 to 1.0 s (declared about 1.008 s), sampled at
    1 frame/s: the ticks at 0 and 1.0 s both have a frame, so both are planned and taken (a
    slack counted in frames of the sampling rate, 10 ms here, once planned only the first)."""
    data = make_video(constant_rate(1.0 + 1 / 120, 120), container=container, rate=120)
    video = open_video(data, Sampling(fps=1), SETTINGS)
    try:
        assert video.frames == 2
        assert [frame.timestamp for frame in iter_frames(video, SETTINGS)] == pytest.approx(
            [0.0, 1.0], abs=1e-6
        )
    finally:
        video.close()


@pytest.mark.parametrize(("max_frames", "planned"), [(None, 2000), (500, 500)])
def test_a_stream_without_duration_plans_only_a_cap(max_frames, planned):
    data = make_video(constant_rate(1.0, 30), container="matroska", seekable=False)
    video = open_video(data, Sampling(max_frames=max_frames), _limited(max_video_frames=2000))
    try:
        assert (video.frames, video.frames_known) == (planned, False)
    finally:
        video.close()
