"""End-to-end cases of API contract v1, shared by every transport's tests.

A case takes a `call(payload, headers) -> (http_status | None, body)` adapter and a `Context`.
`body` is the v1 response dict on success, else the v1 error object `{"error": {"code",
"message"}, "status"}`; `http_status` is None when the transport has no HTTP status of its own
for failures (RunPod answers 200 with `{"status": "FAILED", "error": "<JSON text>"}`).
`from_http` and `from_runpod_job` turn each transport's answers into that shape.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import json
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from da3_serverless.exports.encoding import decode_depth_png16

Call = Callable[[dict[str, Any], "dict[str, str] | None"], "tuple[int | None, dict[str, Any]]"]
PROCESS_RES = 140  # small: the cases run a real (random-weight) model on CPU


@dataclass
class Context:
    """What the cases need besides the transport: the photos, a local HTTP server for
    image_url, the service's key, and (optionally) the in-process predictor's float depth for
    an image at a process_res, to compare the transport's numbers with."""

    images_dir: Path
    image_url: Callable[[str], str]
    api_key: str
    reference_depth: Callable[[str, int], np.ndarray] | None = None

    def b64(self, name: str) -> str:
        return base64.b64encode((self.images_dir / name).read_bytes()).decode("ascii")


# --- adapters ---


def from_http(status_code: int, body: Any) -> tuple[int | None, dict[str, Any]]:
    """A self-hosted answer: the bare v1 response, or RunPod's envelope (input form)."""
    if isinstance(body, dict) and isinstance(body.get("status"), str):
        return from_runpod_job(body, status_code)
    return status_code, body


def from_runpod_job(job: dict[str, Any], http_status: int | None = None):
    """A RunPod job answer (`{"status", "output" | "error"}`) as `(http_status, body)`; the
    error's JSON text becomes the v1 error object. `http_status` is passed through."""
    if job.get("status") == "COMPLETED":
        return http_status, job["output"]
    error = job.get("error")
    parsed = json.loads(error) if isinstance(error, str) else error
    assert isinstance(parsed, dict) and {"code", "status", "message"} <= set(parsed), job
    body = {"error": {"code": parsed["code"], "message": parsed["message"]}}
    return (None if http_status == 200 else http_status), {**body, "status": parsed["status"]}


# --- helpers ---


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (random port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` but carries almost no pixel data: a size limit must
    refuse it from the header alone, before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def assert_ok(result: tuple[int | None, dict[str, Any]]) -> dict[str, Any]:
    status, body = result
    assert status in (None, 200), (status, body)
    assert "error" not in body, body
    assert body["schema_version"] == "1"
    return body


def assert_error(result, code: str, status: int, *fragments: str) -> str:
    """The call failed with `code`/`status`, a message holding each fragment (case-insensitive)."""
    http_status, body = result
    assert set(body) == {"error", "status"}, body
    assert body["error"]["code"] == code, body
    assert body["status"] == status, body
    assert http_status in (None, status), (http_status, body)
    message = body["error"]["message"]
    assert len(message) > 15 and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)
    return message


def depth_from_png(body: dict[str, Any]) -> np.ndarray:
    png = base64.b64decode(body["image_base64"])
    return decode_depth_png16(png, body["min_depth"], body["max_depth"])


# --- cases ---


def case_base64(call: Call, ctx: Context) -> dict[str, Any]:
    """A photo as base64: a 16-bit PNG at the photo's size, its range, the camera."""
    payload = {"api_key": ctx.api_key, "image_base64": ctx.b64("soh-000.png"),
               "process_res": PROCESS_RES}  # fmt: skip
    body = assert_ok(call(payload, None))
    with Image.open(ctx.images_dir / "soh-000.png") as photo:
        assert (body["width"], body["height"]) == photo.size
    png = Image.open(io.BytesIO(base64.b64decode(body["image_base64"])))
    assert png.size == (body["width"], body["height"])
    assert png.mode in ("I;16", "I;16B", "I")
    assert body["min_depth"] <= body["max_depth"]
    assert np.asarray(body["intrinsics"]).shape == (3, 3)
    assert np.asarray(body["extrinsics"]).shape == (3, 4)
    assert body["units"] in ("m", "relative")
    return body


def case_image_url(call: Call, ctx: Context) -> dict[str, Any]:
    """The same photo by URL (a local HTTP server; the service allows private URLs here)."""
    payload = {"api_key": ctx.api_key, "image_url": ctx.image_url("soh-010.png"),
               "process_res": PROCESS_RES}  # fmt: skip
    body = assert_ok(call(payload, None))
    with Image.open(ctx.images_dir / "soh-010.png") as photo:
        assert (body["width"], body["height"]) == photo.size
    return body


def case_png16_and_npy(call: Call, ctx: Context) -> None:
    """depth_npy is the float depth itself (its range is the response's, and it matches the
    in-process predictor); the 16-bit PNG decodes to it within one step (max-min)/65535."""
    payload = {"api_key": ctx.api_key, "image_base64": ctx.b64("soh-000.png"),
               "process_res": PROCESS_RES, "outputs": ["depth", "depth_npy"]}  # fmt: skip
    body = assert_ok(call(payload, None))
    npy = np.load(io.BytesIO(base64.b64decode(body["depth_npy"]["base64"])), allow_pickle=False)
    assert npy.dtype == np.float32 and npy.shape == (body["height"], body["width"])
    assert float(npy.min()) == body["min_depth"] and float(npy.max()) == body["max_depth"]
    step = (body["max_depth"] - body["min_depth"]) / 65535
    decoded = depth_from_png(body)
    assert np.abs(decoded - npy).max() <= step * 1.0001 + 1e-7
    if ctx.reference_depth is not None:
        reference = ctx.reference_depth("soh-000.png", PROCESS_RES)
        assert reference.shape == npy.shape
        np.testing.assert_allclose(npy, reference, rtol=1e-4, atol=1e-5)
        assert np.abs(decoded - reference).max() <= step + 1e-4 * float(np.abs(reference).max())


def bad_inputs(ctx: Context) -> list[tuple[str, dict[str, Any], str, int, tuple[str, ...]]]:
    """(name, payload, code, status, message fragments) for requests the service must refuse."""
    key = {"api_key": ctx.api_key}
    photo = ctx.b64("soh-000.png")
    truncated = base64.b64encode((ctx.images_dir / "soh-000.png").read_bytes()[:5000]).decode()
    return [
        ("no image", {**key}, "invalid_input", 400, ("exactly one of",)),
        ("two sources", {**key, "image_base64": photo, "image_url": ctx.image_url("soh-000.png")},
         "invalid_input", 400, ("exactly one of",)),
        ("typo field", {**key, "image_base64": photo, "proces_res": 140}, "invalid_input", 400,
         ("did you mean 'process_res'",)),
        ("string process_res", {**key, "image_base64": photo, "process_res": "140"},
         "invalid_input", 400, ("process_res",)),
        ("bad output", {**key, "image_base64": photo, "outputs": ["mesh"]}, "invalid_input", 400,
         ("outputs",)),
        ("unknown model", {**key, "image_base64": photo, "model_id": "midas"},
         "unsupported_model", 400, ("da3-small",)),
        ("not base64", {**key, "image_base64": "%%% not base64 %%%"}, "invalid_input", 400,
         ("base64",)),
        ("not an image", {**key, "image_base64": base64.b64encode(b"hello " * 50).decode()},
         "invalid_input", 400, ("not an image",)),
        ("truncated png", {**key, "image_base64": truncated}, "invalid_input", 400,
         ("truncated",)),
        ("huge header", {**key, "image_base64": base64.b64encode(png_header_only(20000, 20000))
         .decode()}, "image_too_large", 413, ("4096",)),
    ]  # fmt: skip


def case_bad_inputs(call: Call, ctx: Context) -> None:
    """Each bad request gets its code and a message that says what to fix; the next good
    request still succeeds (the service keeps serving)."""
    for name, payload, code, status, fragments in bad_inputs(ctx):
        try:
            assert_error(call(payload, None), code, status, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from exc
    good = {"api_key": ctx.api_key, "image_base64": ctx.b64("soh-010.png"),
            "process_res": PROCESS_RES}  # fmt: skip
    assert_ok(call(good, None))


SSRF_URLS = (
    "http://127.0.0.1:9/x.png",
    "http://localhost/x.png",
    "http://[::1]/x.png",
    "http://10.1.2.3/x.png",
    "http://192.168.0.1/x.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://0.0.0.0/x.png",
)


def case_ssrf(call: Call, ctx: Context) -> None:
    """With private URLs not allowed (the default): every private, loopback, link-local or
    metadata address and every non-http scheme is refused before anything is fetched."""
    for url in SSRF_URLS:
        assert_error(call({"api_key": ctx.api_key, "image_url": url}, None), "invalid_input", 400,
                     "public")  # fmt: skip
    for url in ("file:///etc/passwd", "ftp://example.com/x.png", "gopher://127.0.0.1/"):
        assert_error(call({"api_key": ctx.api_key, "image_url": url}, None), "invalid_input", 400,
                     "http")  # fmt: skip


def case_auth(call: Call, ctx: Context) -> None:
    """A missing or wrong key is 401 and the message never echoes what was sent."""
    photo = ctx.b64("soh-000.png")
    assert_error(call({"image_base64": photo}, None), "unauthorized", 401, "key")
    wrong = "wrong-key-" + "x" * 12
    message = assert_error(call({"api_key": wrong, "image_base64": photo}, None), "unauthorized",
                           401, "wrong")  # fmt: skip
    assert wrong not in message and ctx.api_key not in message
