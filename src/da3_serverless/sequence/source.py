"""Where a sequence's frames come from: a video (`video_url` through the safe download, or
`video_base64`) sampled by `api/video.py`, or `images` with `"sequence": true`, fetched and
decoded one at a time as the chunks need them. Either way a lazy stream of (upright RGB
image, timestamp) with the frame size known from the headers first."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from da3_serverless.api.download import fetch_url
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.images import decode_base64, decode_opened, open_image
from da3_serverless.api.schema import RunRequest
from da3_serverless.api.video import OpenedVideo, Sampling, iter_frames, open_video
from da3_serverless.config import Settings
from da3_serverless.inference.cancel import CancelToken


@dataclass
class Frame:
    image: Image.Image
    timestamp: float


@dataclass
class FrameSource:
    """A sequence's frames, lazily: `width` x `height` from the first frame's header,
    `planned` the most frames it can give (`planned_known`: the headers gave that count, not
    a cap), `frames` the stream; `close` frees the input."""

    width: int
    height: int
    planned: int
    frames: Iterator[Frame]
    video: OpenedVideo | None = field(default=None)
    planned_known: bool = True

    def close(self) -> None:
        if self.video is not None:
            self.video.close()


def open_source(request: RunRequest, settings: Settings, cancel: CancelToken) -> FrameSource:
    """The request's frames (a video, or images as a sequence), headers checked."""
    if request.images is not None:
        return _image_source(request, settings, cancel)
    if request.video_url is not None:
        limits = settings.model_copy(update={"max_download_bytes": settings.max_video_bytes})
        try:
            data = fetch_url(request.video_url, limits)
        except ServiceError as error:
            raise ServiceError(error.code, f"video_url: {error.message}") from None
    else:
        try:
            data = decode_base64(request.video_base64 or "")
        except ServiceError as error:
            raise ServiceError(error.code, f"video_base64: {error.message}") from None
    cancel.check()
    sampling = Sampling(request.fps, request.start_s, request.end_s, request.max_frames)
    video = open_video(data, sampling, settings, "the video")
    del data  # the container holds what it needs
    frames = (Frame(f.image, f.timestamp) for f in iter_frames(video, settings, cancel))
    return FrameSource(video.width, video.height, video.frames, frames, video, video.frames_known)


def _image_source(request: RunRequest, settings: Settings, cancel: CancelToken) -> FrameSource:
    refs = request.images or []
    first = _open(request, 0, settings, cancel)
    count = min(len(refs), request.max_frames or len(refs))

    def frames() -> Iterator[Frame]:
        size = None
        for index in range(count):
            opened = first if index == 0 else _open(request, index, settings, cancel)
            image = decode_opened(opened, settings).image
            size = size or image.size
            if image.size != size:  # chunks are aligned frame to frame at one size
                raise ServiceError(
                    "invalid_input",
                    f"images[{index}] is {image.size[0]}x{image.size[1]} (upright) but the "
                    f"sequence's first frame is {size[0]}x{size[1]}: a sequence's frames share "
                    "one size, so resize them to one size or send them as a video",
                )
            yield Frame(image, index / request.fps if request.fps else float(index))

    return FrameSource(first.width, first.height, count, frames())


def _open(request: RunRequest, index: int, settings: Settings, cancel: CancelToken):
    cancel.check()
    ref = (request.images or [])[index]
    source = f"images[{index}]"
    try:
        data = fetch_url(ref.url, settings) if ref.url is not None else decode_base64(ref.base64)
    except ServiceError as error:
        raise ServiceError(error.code, f"{source}: {error.message}") from None
    return open_image(data, settings, source)
