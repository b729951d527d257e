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


_URL_SAFE = bytes.maketrans(b"-_", b"+/")
_WHITESPACE = b" \t\n\r\v\f"
# Characters decoded at once (a multiple of 4): a few of these at a time beside the result.
_BASE64_CHUNK = 1 << 20
_NOT_BASE64 = (
    "the image is not valid base64: encode the file's bytes with standard base64 "
    "(e.g. `base64 -w0 photo.jpg`), optionally as a data URI"
)


def decode_base64(text: str) -> bytes:
    """Bytes from raw base64 (standard or URL-safe alphabet, padding optional, ASCII whitespace
    ignored anywhere) or a `data:<type>;base64,<data>` URI. Raises
    `ServiceError("invalid_input")`.

    Decoded `_BASE64_CHUNK` characters at a time into one growing buffer whose bytes are the
    result, so memory grows by about the decoded size (three quarters of the text) and a few
    chunks, whitespace or not: the text is never copied whole."""
    start, end = _base64_span(text)
    result = BytesIO()
    carry = b""
    for offset in range(start, end, _BASE64_CHUNK):
        piece = carry + _base64_chars(text[offset : min(end, offset + _BASE64_CHUNK)])
        whole = len(piece) - len(piece) % 4
        result.write(_decode_quads(piece[:whole]))
        carry = piece[whole:]
    if len(carry) == 1:
        raise ServiceError("invalid_input", _NOT_BASE64)
    result.write(_decode_quads(carry + b"=" * (-len(carry) % 4)))
    if not result.tell():
        raise ServiceError("invalid_input", "the base64 image is empty: send the image's bytes")
    return result.getvalue()  # the buffer itself, not a copy


def _base64_span(text: str) -> tuple[int, int]:
    """Where the base64 characters of `text` start and end: after a data URI's header, before
    trailing padding and whitespace (by index, so the text is not copied)."""
    start = len(text) - len(text.lstrip())
    if text[start : start + 5].lower() == "data:":
        comma = text.find(",", start, start + 256)
        if comma < 0 or ";base64" not in text[start:comma].lower():
            raise ServiceError(
                "invalid_input",
                "a data URI must look like data:image/png;base64,<base64 data>",
            )
        start = comma + 1
    end = len(text)
    while end > start and (text[end - 1] == "=" or text[end - 1].isspace()):
        end -= 1
    return start, end


def _base64_chars(text: str) -> bytes:
    """A slice of the text as base64 bytes: ASCII only, whitespace removed, URL-safe letters
    turned standard; padding is only allowed at the end (`_base64_span` cut it off)."""
    try:
        chars = text.encode("ascii").translate(_URL_SAFE, _WHITESPACE)
    except UnicodeEncodeError:
        raise ServiceError("invalid_input", _NOT_BASE64) from None
    if b"=" in chars:
        raise ServiceError("invalid_input", _NOT_BASE64)
    return chars


def _decode_quads(chars: bytes) -> bytes:
    """Standard base64 whose length is a multiple of 4 -> bytes."""
    try:
        return base64.b64decode(chars, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError("invalid_input", _NOT_BASE64) from None


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
