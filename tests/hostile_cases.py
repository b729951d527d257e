"""Hostile inputs, built in code, shared by tests/test_hostile.py and bench/hostile.py.

- Payload builders: gzip bombs (one layer, and stacked layers of a few hundred bytes that
  expand to a GiB), header-only image bombs in every format `api/images.py` accepts, files with
  many frames, bodies that cost parsing, cameras that overflow or are not rigid.
- `serve_hostile`: a local HTTP server on 127.0.0.1 that serves compressed bodies, unsupported
  encodings, broken redirects and a slow drip.
- `CASES`: one `Case` per hostile input, with the answer expected once the service handles it
  (status, error code), and `measure`, which sends a case to a running server (self-hosted or
  RunPod's local API) and returns the answer, the time to answer and the server's peak memory
  growth (`/proc/<pid>/status` VmHWM, reset before the case by writing 5 to `clear_refs`).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pillow_heif
from PIL import Image

from paths import IMAGES

pillow_heif.register_heif_opener()  # HEIF is written here, not only read

DOWNLOAD_TIMEOUT_S = 4.0
MAX_DOWNLOAD_BYTES = 8_000_000
PROCESS_RES = 28
HUGE_SIDE = 16_000  # past Pillow's decompression-bomb limit, within WebP's and AVIF's (16384)


def server_settings_env() -> dict[str, str]:
    """Settings the hostile cases are written for (added to a server's environment)."""
    return {
        "DOWNLOAD_TIMEOUT_S": str(DOWNLOAD_TIMEOUT_S),
        "MAX_DOWNLOAD_BYTES": str(MAX_DOWNLOAD_BYTES),
    }


# ---- payload builders -------------------------------------------------------------------------


def gzip_of_zeros(size: int, block: int = 1 << 20) -> bytes:
    """A valid gzip member of `size` zero bytes (a multiple of `block`), built without holding
    them: one fully flushed deflate block of zeros repeated (a full flush resets the window, so
    each copy decodes on its own)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(block)
    compressor.compress(zeros)
    compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // block):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return header + repeated * (size // block) + compressor.flush() + trailer


@cache
def gzip_bomb() -> bytes:
    """1 GiB of zeros in one gzip layer (about 1 MB)."""
    return gzip_of_zeros(1 << 30)


@cache
def stacked_gzip_bomb() -> bytes:
    """The same GiB under three gzip layers: a few hundred bytes on the wire."""
    return gzip.compress(gzip.compress(gzip_bomb(), 9), 9)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def png_claiming(width: int, height: int, extra: bytes = b"") -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))  # fmt: skip


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00\x3b"


def bmp_claiming(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\0" * 64
    return b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) + info + pixels


def _tiff_ifd(width: int, height: int, pixels_at: int, next_ifd: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, pixels_at), (278, 4, 1, height),
               (279, 4, 1, 4)]  # fmt: skip
    body = b"".join(struct.pack("<HHII", *entry) for entry in entries)
    return struct.pack("<H", len(entries)) + body + struct.pack("<I", next_ifd)


def tiff_claiming(width: int, height: int) -> bytes:
    return b"II*\x00" + struct.pack("<I", 8) + _tiff_ifd(width, height, 8 + 102, 0) + b"\0" * 4


def webp_claiming(width: int, height: int) -> bytes:
    """A real 8x8 lossless WebP whose VP8L header is patched to claim width x height."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "WEBP", lossless=True))
    start = data.index(b"VP8L") + 9  # chunk id, size, signature byte 0x2f
    bits = int.from_bytes(data[start : start + 4], "little") & ~((1 << 28) - 1)
    bits |= (width - 1) | ((height - 1) << 14)
    data[start : start + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def heif_claiming(fmt: str, width: int, height: int) -> bytes:
    """A real 64x64 HEIF or AVIF whose image size properties (`ispe`) claim width x height."""
    data = bytearray(_encode(Image.new("RGB", (64, 64), (10, 20, 30)), fmt))
    start = 0
    while (index := data.find(b"ispe", start)) >= 0:
        data[index + 8 : index + 16] = struct.pack(">II", width, height)
        start = index + 4
    return bytes(data)


# Every accepted format, claiming HUGE_SIDE x HUGE_SIDE pixels with a few hundred bytes.
HEADER_BOMBS: dict[str, Callable[[], bytes]] = {
    "JPEG": lambda: jpeg_claiming(HUGE_SIDE, HUGE_SIDE),
    "PNG": lambda: png_claiming(HUGE_SIDE, HUGE_SIDE),
    "WEBP": lambda: webp_claiming(HUGE_SIDE, HUGE_SIDE),
    "BMP": lambda: bmp_claiming(HUGE_SIDE, HUGE_SIDE),
    "TIFF": lambda: tiff_claiming(HUGE_SIDE, HUGE_SIDE),
    "GIF": lambda: gif_claiming(HUGE_SIDE, HUGE_SIDE),
    "HEIF": lambda: heif_claiming("HEIF", HUGE_SIDE, HUGE_SIDE),
    "AVIF": lambda: heif_claiming("AVIF", HUGE_SIDE, HUGE_SIDE),
}


def png_text_bomb() -> bytes:
    """A 1x1 PNG with a zTXt chunk that inflates to 256 MiB."""
    compressor = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    text = b"".join(compressor.compress(zeros) for _ in range(256)) + compressor.flush()
    return png_claiming(1, 1, _chunk(b"zTXt", b"Comment\0\0" + text))


def gif_frames(count: int) -> bytes:
    """A 1x1 GIF with `count` frames."""
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
             + b"\x02\x02\x44\x01\x00")  # fmt: skip
    screen = struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    return b"GIF89a" + screen + frame * count + b"\x3b"


def apng_claiming_frames(count: int) -> bytes:
    """A 1x1 animated PNG whose acTL claims `count` frames (it has one)."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    actl = _chunk(b"acTL", struct.pack(">II", count, 0))
    fctl = _chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 1, 1, 0, 0, 1, 1, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + actl + fctl + idat + _chunk(b"IEND", b"")


def tiff_pages(count: int) -> bytes:
    """A 1x1 TIFF with `count` pages."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for page in range(count):
        pixels_at = len(out) + 102
        next_ifd = pixels_at + 4 if page + 1 < count else 0
        out += _tiff_ifd(1, 1, pixels_at, next_ifd) + b"\0" * 4
    return bytes(out)


def webp_frames(count: int) -> bytes:
    frames = [Image.new("RGB", (1, 1), (i % 256, 0, 0)) for i in range(count)]
    return _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


@cache
def small_photo() -> bytes:
    """soh-000 at an eighth of its size, as PNG: a good request that runs fast."""
    with Image.open(IMAGES / "soh-000.png") as photo:
        return _encode(photo.convert("RGB").resize((151, 85)), "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def tiny_objects_body(size: int) -> bytes:
    """`[{},{},...]` of about `size` bytes: millions of objects, no key."""
    count = size // 3
    return b"[" + b"{}," * (count - 1) + b"{}]"


# ---- a hostile HTTP server --------------------------------------------------------------------


class _HostileHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        route = ROUTES.get(url.path)
        try:
            if route is None:
                self._reply(404, b"not found")
            else:
                route(self, query)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stall(self, after: float) -> None:
        """Headers at once, one byte just before `after` seconds, then nothing for a minute."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        time.sleep(after)
        self.wfile.write(b"\0")
        self.wfile.flush()
        time.sleep(60)


ROUTES: dict[str, Callable[[_HostileHandler, dict[str, str]], None]] = {
    "/photo.png": lambda h, q: h._reply(200, small_photo()),
    "/photo.png.gz": lambda h, q: h._reply(
        200, gzip.compress(small_photo()), {"Content-Encoding": "gzip"}
    ),
    "/photo.png.deflate": lambda h, q: h._reply(
        200, zlib.compress(small_photo()), {"Content-Encoding": "deflate"}
    ),
    "/gzip-bomb": lambda h, q: h._reply(200, gzip_bomb(), {"Content-Encoding": "gzip"}),
    "/gzip-stacked": lambda h, q: h._reply(
        200, stacked_gzip_bomb(), {"Content-Encoding": "gzip, gzip, gzip"}
    ),
    "/brotli": lambda h, q: h._reply(200, b"\x0b\x00\x80" * 10, {"Content-Encoding": "br"}),
    "/gzip-truncated": lambda h, q: h._reply(
        200, gzip.compress(small_photo())[:-40], {"Content-Encoding": "gzip"}
    ),
    "/redirect-without-location": lambda h, q: h._reply(302, b""),
    "/redirect-malformed": lambda h, q: h._reply(302, b"", {"Location": "http://[::1"}),
    "/redirect-no-host": lambda h, q: h._reply(302, b"", {"Location": "https:"}),
    "/stall": lambda h, q: h._stall(float(q.get("after", "1"))),
}


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up on purpose are the point here


@contextlib.contextmanager
def serve_hostile() -> Iterator[str]:
    """The hostile routes on 127.0.0.1 (random port); yields the base URL."""
    httpd = _QuietServer(("127.0.0.1", 0), _HostileHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What payloads need: the service's key, the hostile server's URL and a port that the
    refused addresses would be tried on."""

    api_key: str
    hostile_url: str
    port: int = 9


@dataclass(frozen=True)
class Case:
    """One hostile input and the answer it must get: `status` and `code` (None: success;
    `on_runpod` when RunPod's local API answers otherwise). `payload` builds a request object
    (sent as JSON) or raw body bytes (self-hosted only). `group` is its class; `strict` cases
    need a server that refuses private addresses; `run` cases go through `/run` + `/status`
    (self-hosted only)."""

    name: str
    group: str
    payload: Callable[[Context], dict[str, Any] | bytes]
    status: int
    code: str | None
    runpod: bool = True
    strict: bool = False
    run: bool = False
    on_runpod: tuple[int, str] | None = None

    def expected(self, runpod: bool) -> tuple[int, str | None]:
        return self.on_runpod if runpod and self.on_runpod else (self.status, self.code)


OK = (200, None)
BAD = (400, "invalid_input")
TOO_LARGE = (413, "image_too_large")
FETCH_FAILED = (502, "fetch_failed")
K = [[120.0, 0.0, 75.0], [0.0, 120.0, 42.0], [0.0, 0.0, 1.0]]


def _request(ctx: Context, **fields: Any) -> dict[str, Any]:
    base = {"api_key": ctx.api_key, "image_base64": b64(small_photo()), "process_res": PROCESS_RES}
    return {**base, **fields}


def _url(path: str) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: {"api_key": ctx.api_key, "image_url": ctx.hostile_url + path,
                        "process_res": PROCESS_RES}  # fmt: skip


def _host(host: str) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: {"api_key": ctx.api_key, "image_url": f"http://{host}:{ctx.port}/x.png"}


def _image(build: Callable[[], bytes]) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: _request(ctx, image_base64=b64(build()))


def _fields(**fields: Any) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: _request(ctx, **fields)


def _camera(**fields: Any) -> Callable[[Context], dict[str, Any]]:
    return _fields(outputs=["depth", "pointcloud", "depth_npy"], **fields)


def _k(f: float = 120.0, skew: float = 0.0, cx: float = 75.0) -> list[list[float]]:
    return [[f, skew, cx], [skew, f, 42.0], [0.0, 0.0, 1.0]]


def _pose(scale: float = 1.0, flip: float = 1.0, shift: float = 0.5) -> list[list[float]]:
    return [[scale, 0.0, 0.0, shift], [0.0, scale, 0.0, 0.0], [0.0, 0.0, scale * flip, 0.0]]


def _download_cases() -> list[Case]:
    d, stall = "downloads", f"/stall?after={DOWNLOAD_TIMEOUT_S - 0.3:g}"
    return [
        Case("gzip, three stacked layers (1 GiB)", d, _url("/gzip-stacked"), *FETCH_FAILED),
        Case("gzip, one layer (1 GiB)", d, _url("/gzip-bomb"), *TOO_LARGE),
        Case("gzip, one layer (a real photo)", d, _url("/photo.png.gz"), *OK),
        Case("deflate, one layer (a real photo)", d, _url("/photo.png.deflate"), *OK),
        Case("gzip, truncated", d, _url("/gzip-truncated"), *FETCH_FAILED),
        Case("Content-Encoding: br", d, _url("/brotli"), *FETCH_FAILED),
        Case("redirect without Location", d, _url("/redirect-without-location"), *FETCH_FAILED),
        Case("redirect to a malformed Location", d, _url("/redirect-malformed"), *FETCH_FAILED),
        Case("redirect to a URL without host", d, _url("/redirect-no-host"), *FETCH_FAILED),
        Case("a byte just before the deadline, then silence", d, _url(stall), *FETCH_FAILED),
    ] + [
        Case(f"image_url host {host}", "addresses", _host(host), *BAD, runpod=False, strict=True)
        for host in ("[::7f00:1]", "[::ffff:0:7f00:1]", "[64:ff9b:1::7f00:1]", "[fec0::1]")
    ]


def _parsing_cases() -> list[Case]:
    p = "parsing"
    many_fields = lambda: {f"f{n}": 0 for n in range(100_000)}  # noqa: E731
    return [
        Case("30 MB of [{},{},...] without a key", p, lambda ctx: tiny_objects_body(30_000_000),
             *TOO_LARGE, runpod=False),
        Case("100k-deep nesting", p, lambda ctx: b"[" * 100_000, *TOO_LARGE, runpod=False),
        Case("outputs with a million entries", p, _fields(outputs=["none"] * 1_000_000),
             *TOO_LARGE, on_runpod=BAD),
        Case("100k unknown fields", p, lambda ctx: {**_request(ctx), **many_fields()},
             *TOO_LARGE, on_runpod=BAD),
        # More entries than there are outputs (12 today; this file does not import the code).
        Case("outputs with 40 entries", p, _fields(outputs=["depth"] * 40), *BAD),
        Case("17 views", p, _fields(image_base64=None, images=[{"base64": b64(small_photo())}]
             * 17), *BAD),
        Case("image_base64 over MAX_BASE64_CHARS", p, _fields(image_base64="A" * 12_000_000),
             *TOO_LARGE),
    ]  # fmt: skip


def _image_cases() -> list[Case]:
    i = "images"
    return [
        *(Case(f"{fmt} claiming {HUGE_SIDE}x{HUGE_SIDE}", i, _image(build), *TOO_LARGE)
          for fmt, build in HEADER_BOMBS.items()),
        Case("PNG with a 256 MiB zTXt", i, _image(png_text_bomb), *BAD),
        Case("GIF with 100k frames", i, _image(lambda: gif_frames(100_000)), *OK),
        Case("APNG claiming 2^31 frames", i, _image(lambda: apng_claiming_frames(2**31 - 1)),
             *OK),
        Case("TIFF with 20k pages", i, _image(lambda: tiff_pages(20_000)), *OK),
        Case("WebP with 2000 frames", i, _image(lambda: webp_frames(2000)), *OK),
    ]  # fmt: skip


def _camera_cases() -> list[Case]:
    c = "cameras"
    return [
        Case("intrinsics past float32 (1e39)", c, _camera(intrinsics=_k(1e39)), *BAD),
        Case("intrinsics past float32, by /run + /status", c, _camera(intrinsics=_k(1e39)), *BAD,
             runpod=False, run=True),
        Case("focal length 1e-300", c, _camera(intrinsics=_k(1e-300)), *BAD),
        Case("rank-deficient intrinsics", c, _camera(intrinsics=_k(skew=120.0)), *BAD),
        Case("principal point far outside", c, _camera(intrinsics=_k(cx=1e7)), *BAD),
        Case("focal_length_px past float32", c, _camera(focal_length_px=1e39), *BAD),
        Case("extrinsics scaled (not rigid)", c, _camera(intrinsics=K, extrinsics=_pose(2.0)),
             *BAD),
        Case("extrinsics a reflection", c, _camera(intrinsics=K, extrinsics=_pose(flip=-1.0)),
             *BAD),
        Case("extrinsics translation past float32", c,
             _camera(intrinsics=K, extrinsics=_pose(shift=1e39)), *BAD),
    ]  # fmt: skip


def _cases() -> list[Case]:
    return _download_cases() + _parsing_cases() + _image_cases() + _camera_cases()


CASES: list[Case] = _cases()


def good_request(ctx: Context) -> dict[str, Any]:
    """A request that must succeed right after any hostile one (the cheapest there is)."""
    return _request(ctx)


def good_camera_request(ctx: Context) -> dict[str, Any]:
    """A good request with cameras and a point cloud."""
    return _request(ctx, outputs=["depth", "pointcloud"], intrinsics=K, extrinsics=_pose())


# ---- sending and measuring --------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What came back: the v1 status and error code (None on success), seconds to answer, the
    server's peak memory growth in MB, and every HTTP status seen (`/status` polls included)."""

    status: int
    code: str | None
    seconds: float
    growth_mb: float
    http_statuses: tuple[int, ...]


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def reset_peak(pid: int) -> int:
    """Reset the process's peak resident size to its current one (returned, kB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return vm_hwm_kb(pid)


def measure(case: Case, url: str, pid: int, ctx: Context, runpod: bool = False) -> Answer:
    """Send `case` to the server at `url` (process `pid`): self-hosted, or RunPod's local API
    when `runpod` (the request wrapped as `{"input": ...}`)."""
    payload = case.payload(ctx)
    if isinstance(payload, dict):
        payload = json.dumps({"input": payload} if runpod else payload).encode()
    baseline = reset_peak(pid)
    start = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        if case.run:
            status, code, seen = _run_and_poll(client, url, payload, ctx)
        else:
            headers = {"Content-Type": "application/json"}
            response = client.post(f"{url}/runsync", content=payload, headers=headers)
            status, code = _outcome(response)
            seen = (response.status_code,)
    seconds = time.perf_counter() - start
    growth = (vm_hwm_kb(pid) - baseline) / 1024
    return Answer(status, code, seconds, growth, seen)


def _outcome(response: httpx.Response) -> tuple[int, str | None]:
    """(v1 status, error code) of any answer: bare, RunPod's job, or not JSON at all."""
    try:
        body = response.json()
    except ValueError:
        return response.status_code, f"not JSON: {response.text[:40]!r}"
    if isinstance(body, dict) and body.get("status") == "COMPLETED":
        return 200, None
    if isinstance(body, dict) and body.get("status") == "FAILED":
        error = json.loads(body["error"]) if isinstance(body["error"], str) else body["error"]
        return error["status"], error["code"]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["status"], body["error"]["code"]
    return response.status_code, None


def _run_and_poll(
    client: httpx.Client, url: str, payload: bytes, ctx: Context
) -> tuple[int, str | None, tuple[int, ...]]:
    started = client.post(f"{url}/run", content=payload)
    seen = [started.status_code]
    if started.status_code != 200:
        return (*_outcome(started), tuple(seen))
    job = started.json()["id"]
    for _ in range(600):
        polled = client.get(f"{url}/status/{job}", headers={"X-API-Key": ctx.api_key})
        seen.append(polled.status_code)
        try:
            state = polled.json().get("status")
        except ValueError:
            state = None
        if state in ("COMPLETED", "FAILED") or (len(seen) > 20 and polled.status_code != 200):
            return (*_outcome(polled), tuple(seen))
        time.sleep(0.1)
    raise AssertionError(f"job {job} never finished")
