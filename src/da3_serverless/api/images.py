"""Getting the request's images: base64 and URL sources, careful decoding.

Everything here treats its input as hostile (docs/ARCHITECTURE.md §5): sizes are checked from
the header before pixels are decoded, only a fixed set of formats is parsed; downloads (public
addresses only, one deadline, bounded bytes) are `api/download.py`'s.
"""

from __future__ import annotations

import base64
import binascii
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO

import pillow_heif
from PIL import Image

from da3_serverless.api.download import fetch_url
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import RunRequest, check_limits
from da3_serverless.config import Settings
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.inference.preprocess import upright_rgb

pillow_heif.register_heif_opener()

# Only these decoders ever see client bytes (Pillow would otherwise also try EPS via Ghostscript
# and a long tail of rarely exercised formats). The JPEG opener also covers MPO camera files.
# AVIF is kept only where this Pillow build has it.
Image.init()
FORMATS = tuple(
    f for f in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "HEIF", "AVIF") if f in Image.OPEN
)
FORMATS_TEXT = "JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC/HEIF or AVIF"


@dataclass(frozen=True)
class DecodedImage:
    """One decoded view: `image` is RGB, EXIF-orientation applied; `focal_length_px` comes from
    the EXIF 35 mm equivalent focal length when present; `source` names the request field."""

    image: Image.Image
    focal_length_px: float | None
    width: int
    height: int
    source: str


@dataclass(frozen=True)
class OpenedImage:
    """One view whose header is read and checked, its pixels not decoded yet: `image` is
    Pillow's lazy image, `width` x `height` its stored size (before EXIF orientation)."""

    image: Image.Image
    width: int
    height: int
    source: str


# ---- decoding ---------------------------------------------------------------------------------


_URL_SAFE = str.maketrans("-_", "+/")


def decode_base64(text: str) -> bytes:
    """Bytes from raw base64 (standard or URL-safe alphabet, padding optional, whitespace
    ignored) or a `data:<type>;base64,<data>` URI. Raises `ServiceError("invalid_input")`."""
    body = text.strip()
    if body[:5].lower() == "data:":
        header, comma, body = body.partition(",")
        if not comma or ";base64" not in header.lower():
            raise ServiceError(
                "invalid_input",
                "a data URI must look like data:image/png;base64,<base64 data>",
            )
    body = "".join(body.split())  # whitespace anywhere (wrapped base64); fast in C
    if "-" in body or "_" in body:  # URL-safe alphabet
        body = body.translate(_URL_SAFE)
    body = body.rstrip("=")
    if not body:
        raise ServiceError("invalid_input", "the base64 image is empty: send the image's bytes")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(
            "invalid_input",
            "the image is not valid base64: encode the file's bytes with standard base64 "
            "(e.g. `base64 -w0 photo.jpg`), optionally as a data URI",
        ) from None


def decode_image(data: bytes, settings: Settings, source: str = "image") -> DecodedImage:
    """Decode untrusted image bytes into an RGB `DecodedImage`: `open_image`, then
    `decode_opened`. Raises `ServiceError` only (MemoryError aside)."""
    return decode_opened(open_image(data, settings, source), settings)


def open_image(data: bytes, settings: Settings, source: str = "image") -> OpenedImage:
    """Read untrusted image bytes up to the header and check the size, decoding no pixel.

    A side above `settings.max_image_side`, or a decompression bomb, raises
    `ServiceError("image_too_large")`; unknown formats raise `ServiceError("invalid_input")`.
    """
    try:
        image = Image.open(BytesIO(data), formats=FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError:
        raise _too_large(source, None, settings) from None
    except MemoryError:
        raise
    except Exception:  # Pillow's identify step raises many types on hostile bytes
        raise ServiceError(
            "invalid_input",
            f"{source} is not an image this server can read: send a {FORMATS_TEXT} file",
        ) from None
    width, height = image.size
    if max(width, height) > settings.max_image_side:
        raise _too_large(source, (width, height), settings)
    if width < 1 or height < 1:
        raise ServiceError("invalid_input", f"{source} has no pixels ({width}x{height})")
    return OpenedImage(image, width, height, source)


def decode_opened(opened: OpenedImage, settings: Settings) -> DecodedImage:
    """The pixels of an opened image, as an RGB `DecodedImage` (EXIF orientation applied).

    Damaged files raise `ServiceError("invalid_input")`, a decompression bomb
    `ServiceError("image_too_large")`. Animations give their first frame.
    """
    image, source = opened.image, opened.source
    try:
        image.load()  # first frame of an animation
        rgb, focal = upright_rgb(image)
    except Image.DecompressionBombError:
        raise _too_large(source, None, settings) from None
    except MemoryError:
        raise
    except Exception:  # truncated or corrupt data: decoders raise OSError, SyntaxError, ...
        raise ServiceError(
            "invalid_input",
            f"{source} could not be decoded (the file is truncated or damaged): send the "
            f"complete, unmodified {FORMATS_TEXT} file",
        ) from None
    return DecodedImage(rgb, focal, rgb.width, rgb.height, source)


def _too_large(source: str, size: tuple[int, int] | None, settings: Settings) -> ServiceError:
    limit = settings.max_image_side
    what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels (a decompression bomb?)"
    return ServiceError(
        "image_too_large",
        f"{source} is {what}; this server accepts at most {limit}x{limit}: resize the image "
        f"so its longest side is at most {limit} px",
    )


# ---- the request's views ------------------------------------------------------------------


def _open_one(
    source: str,
    url: str | None,
    data_b64: str | None,
    settings: Settings,
    cancel: CancelToken | None = None,
):
    if cancel is not None:
        cancel.check()
    try:
        data = fetch_url(url, settings) if url is not None else decode_base64(data_b64 or "")
    except ServiceError as exc:
        raise ServiceError(exc.code, f"{source}: {exc.message}") from None
    if cancel is not None:
        cancel.check()
    return open_image(data, settings, source)


def load_request_images(
    request: RunRequest, settings: Settings, cancel: CancelToken | None = None
) -> list[DecodedImage]:
    """The request's views, decoded, in order: `open_request_images`, then
    `decode_request_images` (the service checks its budget between the two)."""
    opened = open_request_images(request, settings, cancel)
    return decode_request_images(opened, settings, cancel)


def decode_request_images(
    opened: list[OpenedImage], settings: Settings, cancel: CancelToken | None = None
) -> list[DecodedImage]:
    """The pixels of opened views, in order; raises the first view's `ServiceError`, or
    `Cancelled` once `cancel` is cancelled (checked before each view)."""
    decoded = []
    for view in opened:
        if cancel is not None:
            cancel.check()
        decoded.append(decode_opened(view, settings))
    return decoded


def open_request_images(
    request: RunRequest, settings: Settings, cancel: CancelToken | None = None
) -> list[OpenedImage]:
    """The request's views with their bytes in hand and headers read, sizes checked, pixels
    not decoded, in order (at most `settings.max_views`; URLs are fetched concurrently).
    Raises the first view's `ServiceError`, its message prefixed by the field; `Cancelled`
    once `cancel` is cancelled (checked before and after each view's bytes)."""
    check_limits(request, settings)
    if request.images is not None:
        views = [(f"images[{i}]", ref.url, ref.base64) for i, ref in enumerate(request.images)]
    elif request.image_url is not None:
        views = [("image_url", request.image_url, None)]
    else:
        views = [("image_base64", None, request.image_base64)]
    if len(views) == 1:
        return [_open_one(*views[0], settings, cancel)]
    with ThreadPoolExecutor(max_workers=min(8, len(views))) as pool:
        futures = [pool.submit(_open_one, *view, settings, cancel) for view in views]
        return [future.result() for future in futures]
