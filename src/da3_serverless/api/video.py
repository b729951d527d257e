"""Videos as input: opening untrusted bytes with PyAV, checking the limits from the container's
and stream's headers before any frame is decoded, and sampling frames lazily (decoded in order,
only the sampled ones converted to RGB, rotation metadata applied).

Everything here treats its input as hostile (docs/ARCHITECTURE.md §5 and §8): only a few
demuxers and decoders ever see client bytes; declared sizes, durations and frame counts are
checked first, and the decoded frames are checked again as they come (a stream may lie).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from io import BytesIO

import av
import numpy as np
from PIL import Image

from da3_serverless.api.errors import ServiceError
from da3_serverless.config import Settings
from da3_serverless.inference.cancel import CancelToken

# Demuxers (PyAV's container format names) and decoders that may read client bytes.
CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4", "mjpeg", "ffv1")
CONTAINERS_TEXT = "MP4, MOV, WebM or MKV"
# The most frames a second a stream may hold: bounds the decoding of frames without times (or
# whose times do not advance), which the duration limit cannot stop.
MAX_STREAM_FPS = 240
# Frame times are rounded to the container's clock (often milliseconds): a frame this close
# before a sampling tick counts as on it.
TIME_TOLERANCE = Fraction(1, 1000)


@dataclass(frozen=True)
class Sampling:
    """Which frames to take: `fps` per second of video (None: every frame), from `start_s` to
    `end_s` (None: the end), at most `max_frames`."""

    fps: float | None = None
    start_s: float = 0.0
    end_s: float | None = None
    max_frames: int | None = None


@dataclass(frozen=True)
class VideoFrame:
    """One sampled frame: upright RGB, its time in seconds from the stream's start, and its
    index among the sampled frames."""

    image: Image.Image
    timestamp: float
    index: int


@dataclass
class OpenedVideo:
    """A video whose headers are read and checked; `frames` is the most frames the sampling
    can give (what the request is priced by), `frames_known` whether the headers gave that
    count (else it is a cap: the stream declares no duration), `width` x `height` the stored
    frame size."""

    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    width: int
    height: int
    duration_s: float | None
    frames: int
    sampling: Sampling
    source: str
    frames_known: bool = True

    def close(self) -> None:
        self.container.close()


def open_video(data: bytes, sampling: Sampling, settings: Settings, source: str = "video"):
    """Open untrusted video bytes and check them against the limits from their headers
    (bytes, pixels per frame, duration, sampled frames), decoding nothing. Raises
    `ServiceError`: `request_too_large` past a limit, `image_too_large` for frames with too many
    pixels, `invalid_input` for what cannot be read."""
    if len(data) > settings.max_video_bytes:
        raise ServiceError(
            "request_too_large",
            f"{source} is {len(data)} bytes; this server accepts videos of at most "
            f"{settings.max_video_bytes} bytes (MAX_VIDEO_BYTES): cut or re-encode it",
        )
    container = _open_container(data, source)
    try:
        return _checked(container, sampling, settings, source)
    except BaseException:
        container.close()
        raise


def _open_container(data: bytes, source: str) -> av.container.InputContainer:
    try:
        container = av.open(BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError):
        raise _unreadable(source) from None
    if container.format.name not in CONTAINERS:
        container.close()
        raise _unreadable(source)
    return container


def _checked(container, sampling: Sampling, settings: Settings, source: str) -> OpenedVideo:
    if not container.streams.video:
        raise ServiceError(
            "invalid_input", f"{source} has no video stream (audio only?): send a video file"
        )
    stream = container.streams.video[0]
    codec = stream.codec_context
    if codec is None or codec.name not in CODECS:
        name = codec.name if codec is not None else "unknown"
        raise ServiceError(
            "invalid_input",
            f"{source} uses the {name} codec, which this server does not decode: re-encode it "
            "as H.264, H.265, VP9 or AV1",
        )
    width, height = codec.width, codec.height
    _check_pixels(width, height, settings, source)
    stream.thread_type = "AUTO"
    duration = _declared_duration(container, stream)
    _check_span(duration, sampling, settings, source)
    frames, known = _planned_frames(stream, duration, sampling, settings, source)
    return OpenedVideo(
        container, stream, width, height, duration, frames, sampling, source, frames_known=known
    )


def _check_pixels(width: int, height: int, settings: Settings, source: str) -> None:
    if width < 1 or height < 1:
        raise ServiceError("invalid_input", f"{source} declares frames of {width}x{height}")
    if width * height > settings.max_video_pixels:
        raise ServiceError(
            "image_too_large",
            f"{source} has frames of {width}x{height} pixels; this server accepts at most "
            f"{settings.max_video_pixels} pixels per frame (MAX_VIDEO_PIXELS): downscale it",
        )


def _declared_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _check_span(duration: float | None, sampling: Sampling, settings: Settings, source: str):
    end = sampling.end_s if sampling.end_s is not None else duration
    if end is not None and duration is not None:
        end = min(end, duration)
    if end is not None and end > settings.max_video_duration_s:
        raise ServiceError(
            "request_too_large",
            f"{source} runs to {end:.1f} s; this server decodes at most "
            f"{settings.max_video_duration_s:g} s (MAX_VIDEO_DURATION_S): set end_s, or cut it",
        )
    if duration is not None and sampling.start_s >= duration:
        raise ServiceError(
            "invalid_input",
            f"start_s {sampling.start_s:g} is past the end of {source} ({duration:.2f} s)",
        )


def _planned_frames(
    stream, duration, sampling: Sampling, settings: Settings, source: str
) -> tuple[int, bool]:
    """(the most frames the sampling can take, whether the headers gave that count): from the
    declared duration and rate, at most `max_frames`; without a duration (or rate) the cap,
    `max_frames` or MAX_VIDEO_FRAMES, and False. Refused past MAX_VIDEO_FRAMES."""
    cap = settings.max_video_frames
    limit = cap if sampling.max_frames is None else min(sampling.max_frames, cap)
    end = sampling.end_s if sampling.end_s is not None else duration
    if end is not None and duration is not None:
        end = min(end, duration)
    rate = sampling.fps or (float(stream.average_rate) if stream.average_rate else None)
    if end is None or rate is None:
        return limit, False
    # Ticks before the end, less the decoder's time tolerance: containers round their
    # durations up (2.0003 s for 2 s), and `iter_frames` stops at a frame that close to the end.
    span = end - sampling.start_s - float(TIME_TOLERANCE)
    planned = max(math.ceil(span * rate), 0)
    if planned > cap and sampling.max_frames is None:
        raise ServiceError(
            "request_too_large",
            f"{source} gives {planned} frames at {rate:g} frames per second; this server takes "
            f"at most {cap} (MAX_VIDEO_FRAMES): lower fps, set max_frames, or narrow "
            "start_s/end_s",
        )
    return min(planned, limit), True


def _unreadable(source: str) -> ServiceError:
    return ServiceError(
        "invalid_input",
        f"{source} is not a video this server can read: send a {CONTAINERS_TEXT} file",
    )


# ---- decoding ---------------------------------------------------------------------------------


def iter_frames(
    video: OpenedVideo, settings: Settings, cancel: CancelToken | None = None
) -> Iterator[VideoFrame]:
    """The sampled frames, in order, decoded lazily (one at a time). Raises `ServiceError`
    for damaged data, a frame past the pixel limit, a stream past the duration limit, or no
    frame at all in the sampled span; `Cancelled` once `cancel` is cancelled."""
    sampling, stream = video.sampling, video.stream
    step = 1 / Fraction(sampling.fps).limit_denominator(1000) if sampling.fps else None
    start = Fraction(sampling.start_s).limit_denominator(1_000_000)
    end = Fraction(sampling.end_s).limit_denominator(1_000_000) if sampling.end_s else None
    origin = stream.start_time or 0
    taken, target = 0, start - TIME_TOLERANCE
    for decoded, frame in enumerate(_decoded(video)):
        if cancel is not None and decoded % 8 == 0:
            cancel.check()
        if decoded > settings.max_video_duration_s * MAX_STREAM_FPS:
            raise _too_long(video.source, settings)
        if frame.pts is None:
            continue
        time = (frame.pts - origin) * stream.time_base
        if end is not None and time >= end - TIME_TOLERANCE:
            break
        if time > settings.max_video_duration_s:  # every decoded frame, sampled or not
            raise _too_long(video.source, settings)
        if time < target:
            continue
        yield VideoFrame(_upright(frame, settings, video.source), float(time), taken)
        taken += 1
        if taken >= video.frames:
            break
        if step is not None:  # the next tick after this frame
            target = start + (math.floor((time + TIME_TOLERANCE - start) / step) + 1) * step
            target -= TIME_TOLERANCE
    if taken == 0:
        raise ServiceError(
            "invalid_input",
            f"{video.source} has no frame in the sampled span: check start_s and end_s, or "
            "send a video with frames",
        )


def _decoded(video: OpenedVideo) -> Iterator[av.VideoFrame]:
    try:
        if video.sampling.start_s > 0:
            offset = int(video.sampling.start_s / video.stream.time_base)
            video.container.seek(offset + (video.stream.start_time or 0), stream=video.stream)
        yield from video.container.decode(video.stream)
    except av.FFmpegError:
        raise ServiceError(
            "invalid_input",
            f"{video.source} could not be decoded (the file is truncated or damaged): send "
            "the complete, unmodified file",
        ) from None


def _upright(frame: av.VideoFrame, settings: Settings, source: str) -> Image.Image:
    """The frame as RGB, turned as its display matrix says (counter-clockwise degrees)."""
    _check_pixels(frame.width, frame.height, settings, source)
    pixels = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4
    if turns:
        pixels = np.ascontiguousarray(np.rot90(pixels, turns))
    return Image.fromarray(pixels)


def _too_long(source: str, settings: Settings) -> ServiceError:
    return ServiceError(
        "request_too_large",
        f"{source} runs past {settings.max_video_duration_s:g} s (MAX_VIDEO_DURATION_S): set "
        "end_s, or cut it",
    )
