"""Where a sequence's frames come from: a video (`video_url` through the safe download, or
`video_base64`) sampled by `api/video.py`, `images` with `"sequence": true`, fetched and
decoded one at a time as the chunks need them, or a zip of frames (`frames_zip_url`,
`frames_zip_base64`) read by `api/frames_zip.py`, one entry at a time. Either way a lazy
stream of (upright RGB image, timestamp) with the frame size known from the headers first."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

from PIL import Image

from da3_serverless.api.download import fetch_url
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.frames_zip import FramesZip, open_frame, open_frames_zip
from da3_serverless.api.images import OpenedImage, decode_base64, decode_opened, open_image
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
    a cap), `frames` the stream, `warnings` what the response should say about the input;
    `close` frees the input."""

    width: int
    height: int
    planned: int
    frames: Iterator[Frame]
    video: OpenedVideo | None = field(default=None)
    planned_known: bool = True
    archive: FramesZip | None = None
    warnings: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.video is not None:
            self.video.close()
        if self.archive is not None:
            self.archive.close()


def open_source(request: RunRequest, settings: Settings, cancel: CancelToken) -> FrameSource:
    """The request's frames (a video, or images as a sequence), headers checked."""
    if request.images is not None:
        return _image_source(request, settings, cancel)
    if request.frames_zip_url is not None or request.frames_zip_base64 is not None:
        return _zip_source(request, settings, cancel)
    data = _input_bytes(request, "video", settings)
    cancel.check()
    sampling = Sampling(request.fps, request.start_s, request.end_s, request.max_frames)
    video = open_video(data, sampling, settings, "the video")
    del data  # the container holds what it needs
    frames = (Frame(f.image, f.timestamp) for f in iter_frames(video, settings, cancel))
    return FrameSource(video.width, video.height, video.frames, frames, video, video.frames_known)


def _input_bytes(request: RunRequest, kind: str, settings: Settings) -> bytes:
    """The bytes of the request's `<kind>_url` (the safe download, up to MAX_VIDEO_BYTES) or
    `<kind>_base64`, errors prefixed by the field."""
    url = getattr(request, f"{kind}_url")
    name = f"{kind}_url" if url is not None else f"{kind}_base64"
    try:
        if url is not None:
            limits = settings.model_copy(update={"max_download_bytes": settings.max_video_bytes})
            return fetch_url(url, limits)
        return decode_base64(getattr(request, name) or "")
    except ServiceError as error:
        raise ServiceError(error.code, f"{name}: {error.message}") from None


def _zip_source(request: RunRequest, settings: Settings, cancel: CancelToken) -> FrameSource:
    """A zip's image entries in natural name order, each read and decoded as chunks need it."""
    data = _input_bytes(request, "frames_zip", settings)
    cancel.check()
    archive = open_frames_zip(data, settings, request.max_frames)
    del data  # the archive holds it
    try:
        opens = [partial(open_frame, archive, entry, settings) for entry in archive.frames]
        source = _photo_source(opens, request, settings, cancel)
    except BaseException:
        archive.close()
        raise
    source.archive, source.warnings = archive, archive.warnings
    return source


def _image_source(request: RunRequest, settings: Settings, cancel: CancelToken) -> FrameSource:
    refs = request.images or []
    count = min(len(refs), request.max_frames or len(refs))
    opens = [partial(_open, request, index, settings) for index in range(count)]
    return _photo_source(opens, request, settings, cancel)


def _photo_source(
    opens: list[Callable[[], OpenedImage]],
    request: RunRequest,
    settings: Settings,
    cancel: CancelToken,
) -> FrameSource:
    """Photos in order, the first opened now (its size prices the chunks), each decoded as
    the chunks need it; frame i's timestamp is i / fps (else i); all of one size."""
    cancel.check()
    first = opens[0]()

    def frames() -> Iterator[Frame]:
        size = None
        for index, open_one in enumerate(opens):
            cancel.check()
            opened = first if index == 0 else open_one()
            image = decode_opened(opened, settings).image
            size = size or image.size
            if image.size != size:  # chunks are aligned frame to frame at one size
                raise ServiceError(
                    "invalid_input",
                    f"{opened.source} is {image.size[0]}x{image.size[1]} (upright) but the "
                    f"sequence's first frame is {size[0]}x{size[1]}: a sequence's frames share "
                    "one size, so resize them to one size or send them as a video",
                )
            yield Frame(image, index / request.fps if request.fps else float(index))

    return FrameSource(first.width, first.height, len(opens), frames())


def _open(request: RunRequest, index: int, settings: Settings) -> OpenedImage:
    ref = (request.images or [])[index]
    source = f"images[{index}]"
    try:
        data = fetch_url(ref.url, settings) if ref.url is not None else decode_base64(ref.base64)
    except ServiceError as error:
        raise ServiceError(error.code, f"{source}: {error.message}") from None
    return open_image(data, settings, source)
