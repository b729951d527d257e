"""Getting the request's images: base64 and URL sources, safe downloads, careful decoding.

Everything here treats its input as hostile (docs/ARCHITECTURE.md §5): sizes are checked from
the header before pixels are decoded, only a fixed set of formats is parsed, URLs may only reach
public addresses.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO

import httpx
import pillow_heif
from PIL import Image

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import RunRequest, check_limits
from da3_serverless.config import Settings
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
MAX_REDIRECTS = 5
USER_AGENT = "da3-serverless (image fetcher)"
# Cloud metadata endpoints. They are non-global addresses anyway; listed so the intent is explicit.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254")
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


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


# ---- downloading ------------------------------------------------------------------------------


def refusal_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a download may not connect to `ip` (None if it may): only global unicast addresses
    are allowed; IPv6 forms that embed an IPv4 address are judged by that address too."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_multicast:
        return "a multicast address"
    if not ip.is_global:
        kind = "loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private"
        return f"a {kind} or reserved address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return refusal_reason(embedded)
    return None


def resolve(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (TCP). Tests replace this to simulate DNS."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _checked_address(url: httpx.URL) -> str:
    """Resolve the URL's host and return the address to connect to, after checking every
    address it resolves to (a host with one private address among public ones is refused)."""
    host = url.raw_host.decode("ascii")
    try:
        addresses = resolve(host, url.port or (443 if url.scheme == "https" else 80))
    except (OSError, UnicodeError):
        raise ServiceError(
            "fetch_failed", f"could not resolve the image URL's host {host!r}: check the URL"
        ) from None
    for address in addresses:
        reason = refusal_reason(ipaddress.ip_address(address.split("%")[0]))
        if reason:
            raise ServiceError(
                "invalid_input",
                f"the image URL's host {host!r} resolves to {reason}; downloads may only reach "
                "public internet addresses (private, loopback, link-local and metadata addresses "
                "are refused): use a publicly reachable URL or send the image as image_base64",
            )
    if not addresses:
        raise ServiceError("fetch_failed", f"the image URL's host {host!r} has no address")
    return addresses[0]


def _parse_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ServiceError(
            "invalid_input",
            "the image URL must be an absolute http:// or https:// URL "
            "(other schemes such as file:// or ftp:// are refused)",
        )
    return parsed


def fetch_url(url: str, settings: Settings) -> bytes:
    """Download an image over http(s) with size (`settings.max_download_bytes`) and time
    (`settings.download_timeout_s`, for the whole download) caps.

    Unless `settings.allow_private_urls`, every hop (redirects are followed here, at most 5) is
    resolved and checked with `refusal_reason`, and the connection goes to the checked address
    itself: the request is sent to that IP with the original Host header and TLS server name,
    so a DNS answer that changes between check and connect (DNS rebinding) cannot redirect it.
    Errors: invalid_input (bad scheme, refused address), fetch_failed (network, HTTP status,
    timeout), image_too_large (size cap). Messages name the host only, never the full URL (it may
    carry tokens). DNS lookups themselves are not bounded by the time cap.
    """
    current = _parse_url(url)
    deadline = time.monotonic() + settings.download_timeout_s
    with httpx.Client(trust_env=False, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            host = current.host
            if settings.allow_private_urls:
                request = client.build_request("GET", current)
            else:
                address = _checked_address(current)
                request = client.build_request(
                    "GET",
                    current.copy_with(host=address),
                    headers={"Host": current.netloc.decode("ascii")},
                    extensions={"sni_hostname": current.raw_host.decode("ascii")},
                )
            request.headers["User-Agent"] = USER_AGENT
            remaining = deadline - time.monotonic()
            request.extensions["timeout"] = httpx.Timeout(max(remaining, 0.001)).as_dict()
            try:
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        current = _parse_url(str(current.join(response.headers["location"])))
                        continue
                    if response.status_code != 200:
                        raise ServiceError(
                            "fetch_failed",
                            f"the image URL's server ({host}) answered HTTP "
                            f"{response.status_code} {response.reason_phrase}: check that the "
                            "URL is public and points to an image",
                        )
                    return _read_capped(response, settings, deadline, host)
                finally:
                    response.close()
            except httpx.TimeoutException:
                raise _timed_out(host, settings) from None
            except httpx.HTTPError as exc:
                raise ServiceError(
                    "fetch_failed",
                    f"could not download the image from {host} ({type(exc).__name__}): check "
                    "that the URL is reachable from the internet",
                ) from None
    raise ServiceError(
        "fetch_failed",
        f"the image URL redirected more than {MAX_REDIRECTS} times: give the final URL",
    )


def _read_capped(response: httpx.Response, settings: Settings, deadline: float, host: str) -> bytes:
    limit = settings.max_download_bytes
    too_large = ServiceError(
        "image_too_large",
        f"the image at {host} is larger than this server's download limit of {limit} bytes: "
        "send a smaller (e.g. resized or JPEG-compressed) image",
    )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, total = [], 0
    for chunk in response.iter_bytes():  # as the bytes arrive, so the checks below run often
        total += len(chunk)
        if total > limit:
            raise too_large
        if time.monotonic() > deadline:
            raise _timed_out(host, settings)
        chunks.append(chunk)
    return b"".join(chunks)


def _timed_out(host: str, settings: Settings) -> ServiceError:
    return ServiceError(
        "fetch_failed",
        f"downloading the image from {host} took longer than {settings.download_timeout_s:g} s: "
        "use a faster host or send the image as image_base64",
    )


# ---- the request's views ------------------------------------------------------------------


def _open_one(source: str, url: str | None, data_b64: str | None, settings: Settings):
    try:
        data = fetch_url(url, settings) if url is not None else decode_base64(data_b64 or "")
    except ServiceError as exc:
        raise ServiceError(exc.code, f"{source}: {exc.message}") from None
    return open_image(data, settings, source)


def load_request_images(request: RunRequest, settings: Settings) -> list[DecodedImage]:
    """The request's views, decoded, in order: `open_request_images`, then
    `decode_request_images` (the service checks its budget between the two)."""
    return decode_request_images(open_request_images(request, settings), settings)


def decode_request_images(opened: list[OpenedImage], settings: Settings) -> list[DecodedImage]:
    """The pixels of opened views, in order; raises the first view's `ServiceError`."""
    return [decode_opened(view, settings) for view in opened]


def open_request_images(request: RunRequest, settings: Settings) -> list[OpenedImage]:
    """The request's views with their bytes in hand and headers read, sizes checked, pixels
    not decoded, in order (at most `settings.max_views`; URLs are fetched concurrently).
    Raises the first view's `ServiceError`, its message prefixed by the field."""
    check_limits(request, settings)
    if request.images is not None:
        views = [(f"images[{i}]", ref.url, ref.base64) for i, ref in enumerate(request.images)]
    elif request.image_url is not None:
        views = [("image_url", request.image_url, None)]
    else:
        views = [("image_base64", None, request.image_base64)]
    if len(views) == 1:
        return [_open_one(*views[0], settings)]
    with ThreadPoolExecutor(max_workers=min(8, len(views))) as pool:
        futures = [pool.submit(_open_one, *view, settings) for view in views]
        return [future.result() for future in futures]
