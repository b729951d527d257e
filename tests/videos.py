"""Synthetic videos for the tests, made with PyAV: a camera panning across the repository's
photos, at exact frame times (constant or variable rate), optionally with rotation metadata or
no declared duration (a live stream), or an audio-only stream."""

from __future__ import annotations

from fractions import Fraction
from io import BytesIO

import av
import numpy as np
from PIL import Image

from paths import IMAGES


def pan_frames(count: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """`count` RGB crops sliding left to right across soh-000.png (scaled to 3x the crop)."""
    photo = Image.open(IMAGES / "soh-000.png").convert("RGB")
    photo = np.asarray(photo.resize((width * 3, height * 2)))
    span = photo.shape[1] - width
    starts = np.linspace(0, span, count).round().astype(int)
    return [
        np.ascontiguousarray(photo[height // 2 : height // 2 + height, x : x + width])
        for x in starts
    ]


def make_video(
    times: list[float],
    *,
    width: int = 64,
    height: int = 48,
    container: str = "mp4",
    codec: str = "h264",
    rotation: int = 0,
    frames: list[np.ndarray] | None = None,
    seekable: bool = True,
    rate: int = 30,
) -> bytes:
    """A video with one frame at each of `times` (seconds, exact to the millisecond: the
    stream's time base is 1/1000 s), panning across a photo unless `frames` are given.
    `seekable=False` writes it as a live stream is written, to an output the muxer cannot seek
    back in: Matroska then declares no duration (neither the container nor the stream) and no
    cues, so a reader learns the length only by decoding to the end. `rate`: the stream's
    declared frame rate (the last frame lasts 1 / rate in the declared duration)."""
    frames = frames if frames is not None else pan_frames(len(times), width, height)
    buffer = BytesIO() if seekable else _WriteOnly()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for time, pixels in zip(times, frames, strict=True):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = round(time * 1000)
            frame.time_base = Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


class _WriteOnly:
    """A file PyAV can only write to (no `seek`, so FFmpeg treats it as a stream)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)

    def getvalue(self) -> bytes:
        return bytes(self.data)


def constant_rate(seconds: float, fps: int) -> list[float]:
    return [i / fps for i in range(round(seconds * fps))]


def audio_only(seconds: float = 1.0) -> bytes:
    buffer = BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for index in range(int(seconds * 16000 / 1024)):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()
