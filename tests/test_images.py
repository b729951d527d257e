"""Image input: base64, decoding of every format and mode we promise, size limits, safe downloads
against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import ipaddress
import math
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image, ImageFile

from da3_serverless.api import download
from da3_serverless.api.download import fetch_url, refusal_reason
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.images import decode_base64, decode_image, load_request_images
from da3_serverless.api.schema import parse_request
from da3_serverless.config import Settings
from paths import IMAGES

SETTINGS = Settings(allow_private_urls=False)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def refused(code: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ServiceError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value.message


def split_red_blue(size: tuple[int, int] = (60, 40), mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new(mode, size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


# ---- base64 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(b"\x89PNG\xff\xfe data").decode(),
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\xff\xfe data").decode(),
        "DATA:image/png;charset=x;BASE64," + base64.b64encode(b"\x89PNG\xff\xfe data").decode(),
        "  " + "\n".join(base64.b64encode(b"\x89PNG\xff\xfe data").decode()) + "\n",
        base64.urlsafe_b64encode(b"\x89PNG\xff\xfe data").decode().rstrip("="),
    ],
)
def test_decode_base64_variants(text: str) -> None:
    assert decode_base64(text) == b"\x89PNG\xff\xfe data"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("data:image/png;base64,", "empty"),
        ("abc$def", "not valid base64"),
        ("a", "not valid base64"),
        ("data:image/png,rawbytes", "data:image/png;base64,"),
        ("data:image/png;base64", "data:image/png;base64,"),
    ],
)
def test_decode_base64_refuses(text: str, expected: str) -> None:
    assert expected in refused("invalid_input", decode_base64, text)


# ---- decoding -----------------------------------------------------------------------------


def test_real_photo() -> None:
    decoded = decode_image((IMAGES / "soh-000.png").read_bytes(), SETTINGS, source="image_url")
    assert (decoded.width, decoded.height) == (1208, 680)
    assert decoded.image.mode == "RGB" and decoded.image.size == (1208, 680)
    assert decoded.focal_length_px is None
    assert decoded.source == "image_url"


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("JPEG", {"quality": 95}),
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("GIF", {}),
        ("HEIF", {"quality": 95}),
        ("AVIF", {"quality": 95}),
    ],
)
def test_formats(fmt: str, kwargs: dict) -> None:
    decoded = decode_image(encode(split_red_blue(), fmt, **kwargs), SETTINGS)
    assert decoded.image.mode == "RGB" and decoded.image.size == (60, 40)
    assert close(decoded.image.getpixel((5, 20)), (255, 0, 0), tol=40)
    assert close(decoded.image.getpixel((55, 20)), (0, 0, 255), tol=40)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.linspace(0, 65535, 256 * 4).round().astype(np.uint16).reshape(4, 256)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(BytesIO(data)).mode == "I;16"
    rgb = np.asarray(decode_image(data, SETTINGS).image)
    assert rgb.shape == (4, 256, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(values / 257.0).astype(np.uint8))
    assert rgb.max() == 255 and rgb.min() == 0 and len(np.unique(rgb)) > 200


def test_thirty_two_bit_and_float_tiff() -> None:
    small = np.array([[0, 65535], [257, 514]], dtype=np.int32)
    rgb = np.asarray(decode_image(encode(Image.fromarray(small, "I"), "TIFF"), SETTINGS).image)
    np.testing.assert_array_equal(rgb[..., 1], [[0, 255], [1, 2]])
    wide = np.array([[-1000, 0], [1000, 3000]], dtype=np.int32)
    rgb = np.asarray(decode_image(encode(Image.fromarray(wide, "I"), "TIFF"), SETTINGS).image)
    np.testing.assert_array_equal(rgb[..., 2], [[0, 64], [128, 255]])
    depth = np.array([[0.5, 2.5], [1.5, np.nan]], dtype=np.float32)
    rgb = np.asarray(decode_image(encode(Image.fromarray(depth, "F"), "TIFF"), SETTINGS).image)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 255], [128, 0]])


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data, SETTINGS)
    assert decoded.image.mode == "RGB"
    assert close(decoded.image.getpixel((16, 16)), (255, 0, 0), tol=20)


def test_palette_png_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (20, 10), 1)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    image.paste(0, (0, 0, 10, 10))  # index 0 (black) is transparent
    data = encode(image, "PNG", transparency=0)
    decoded = decode_image(data, SETTINGS).image
    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert decoded.getpixel((15, 5)) == (0, 128, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    rgba = Image.new("RGBA", (20, 10), (200, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 10))
    rgba.paste((0, 0, 0, 128), (10, 0, 12, 10))
    decoded = decode_image(encode(rgba.convert(mode), "PNG"), SETTINGS).image
    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    expected = (200, 0, 0) if mode == "RGBA" else (60, 60, 60)  # L of pure red is 60
    assert close(decoded.getpixel((15, 5)), expected, tol=1)
    assert close(decoded.getpixel((11, 5)), (127, 127, 127), tol=2)  # half black on white


@pytest.mark.parametrize("mode", ["L", "1", "P", "I;16"])
def test_other_modes_become_rgb(mode: str) -> None:
    source = Image.new("L", (8, 8), 255).convert(mode) if mode != "I;16" else None
    if source is None:
        source = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    decoded = decode_image(encode(source, "PNG"), SETTINGS).image
    assert decoded.mode == "RGB" and decoded.getpixel((3, 3)) == (255, 255, 255)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(BytesIO(data)).n_frames == 3
    assert decode_image(data, SETTINGS).image.getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize(("orientation", "top_left"), [(1, (255, 0, 0)), (6, (255, 0, 0))])
def test_exif_orientation_and_focal_length(orientation: int, top_left: tuple) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0xA405] = 26  # FocalLengthIn35mmFilm
    data = encode(split_red_blue((60, 40)), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data, SETTINGS)
    if orientation == 6:  # rotate 90° clockwise for display: width and height swap
        assert (decoded.width, decoded.height) == (40, 60)
        assert close(decoded.image.getpixel((20, 5)), (255, 0, 0))  # left half went to the top
        assert close(decoded.image.getpixel((20, 55)), (0, 0, 255))
    else:
        assert (decoded.width, decoded.height) == (60, 40)
        assert close(decoded.image.getpixel((5, 20)), top_left)
    diagonal_mm = math.hypot(36, 24)
    assert decoded.focal_length_px == pytest.approx(26 * math.hypot(60, 40) / diagonal_mm)


def test_exif_focal_length_in_heic() -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 50
    decoded = decode_image(encode(split_red_blue(), "HEIF", exif=exif.tobytes()), SETTINGS)
    assert decoded.focal_length_px == pytest.approx(50 * math.hypot(60, 40) / math.hypot(36, 24))


def test_zero_focal_length_means_unknown() -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 0
    data = encode(split_red_blue(), "JPEG", exif=exif.tobytes())
    assert decode_image(data, SETTINGS).focal_length_px is None


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (invalid) IDAT and no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_sixteen_bit_rgb_png() -> None:
    """48-bit RGB, hand-made (Pillow cannot write it); Pillow keeps each sample's high byte."""
    pixels = np.array([[[65535, 0, 32768], [257, 514, 1000]]], dtype=">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
    decoded = decode_image(data + chunk(b"IEND", b""), SETTINGS).image
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 0, 128) and decoded.getpixel((1, 0)) == (1, 2, 3)


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (5000, 100), (100, 4097)])
def test_oversized_header_is_refused_before_decoding(
    width: int, height: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = png_header_only(width, height)

    # tracemalloc does not see Pillow's C pixel buffers, so also make decoding itself fail loudly.
    def no_decoding(self: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    tracemalloc.start()
    try:
        message = refused("image_too_large", decode_image, data, SETTINGS, "images[2]")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # the pixels (up to 1.2 GB) were never allocated
    assert message.startswith("images[2] is ") and "4096" in message


def test_max_image_side_setting() -> None:
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    assert "300x200" in refused("image_too_large", decode_image, data, Settings(max_image_side=256))
    assert decode_image(data, Settings(max_image_side=300)).width == 300


def test_size_at_the_limit_is_accepted() -> None:
    decoded = decode_image(encode(Image.new("RGB", (4096, 2)), "PNG"), SETTINGS)
    assert (decoded.width, decoded.height) == (4096, 2)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "HEIF"])
def test_truncated_file(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    message = refused("invalid_input", decode_image, data[: len(data) // 2], SETTINGS, "image_url")
    assert message.startswith("image_url ")
    assert "truncated" in message or "not an image" in message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        np.random.default_rng(1).bytes(5000),
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # Pillow could parse EPS: not us
        b"<html><body>Not found</body></html>",
    ],
)
def test_non_images_are_refused(data: bytes) -> None:
    message = refused("invalid_input", decode_image, data, SETTINGS)
    assert "not an image this server can read" in message and "JPEG, PNG" in message


# ---- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.100.100.200",  # carrier-grade NAT / Alibaba metadata
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:a00:1::",  # 6to4 around 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
        "64:ff9b::808:808",  # NAT64 is refused whatever it embeds
    ],
)
def test_refused_addresses(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::1"]
)
def test_public_addresses(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


# ---- downloads against a real local server ------------------------------------------------

PHOTO = (IMAGES / "soh-000.png").read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    hosts: list[str] = []  # noqa: RUF012 - shared on purpose: what the tests inspect

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        Handler.hosts.append(self.headers.get("Host", ""))
        url = urlparse(self.path)
        query = parse_qs(url.query)
        try:
            if url.path == "/photo.png":
                self.reply(200, PHOTO)
            elif url.path == "/redirect":
                self.send_response(int(query.get("code", ["302"])[0]))
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif url.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif url.path == "/endless":  # no Content-Length: only the streaming cap stops it
                self.send_response(200)
                self.end_headers()
                while True:
                    self.wfile.write(b"\0" * 65536)
            elif url.path == "/slow":
                time.sleep(float(query["s"][0]))
                self.reply(200, PHOTO)
            elif url.path == "/drip":  # headers at once, then a byte every 50 ms
                self.send_response(200)
                self.end_headers()
                for _ in range(200):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.reply(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOCAL = Settings(allow_private_urls=True, download_timeout_s=5)


def test_fetch_local_when_private_urls_allowed(server: str) -> None:
    assert fetch_url(f"http://{server}/photo.png", LOCAL) == PHOTO
    redirected = f"http://{server}/redirect?code=307&to=/photo.png"
    assert fetch_url(redirected, LOCAL) == PHOTO


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/photo.png",
        "http://localhost:{port}/photo.png",
        "http://[::1]:{port}/",
    ],
)
def test_loopback_is_refused(server: str, url: str) -> None:
    port = server.split(":")[1]
    message = refused("invalid_input", fetch_url, url.format(port=port), SETTINGS)
    assert "private, loopback, link-local and metadata addresses are refused" in message


def test_metadata_address_is_refused_without_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not connect")

    monkeypatch.setattr(download._DeadlineBackend, "connect_tcp", no_connect)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/"):
        assert "metadata" in refused("invalid_input", fetch_url, url, SETTINGS)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x", "/relative.png", "x"]
)
def test_bad_schemes_are_refused(url: str) -> None:
    assert "http:// or https://" in refused("invalid_input", fetch_url, url, LOCAL)


@pytest.fixture
def public_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend that `public.test` is a public host: it resolves to 127.0.0.1 and that one address
    counts as public. Everything else keeps the real resolver and the real address policy, so a
    redirect from it to any other loopback/metadata address must still be refused."""
    real_resolve, real_reason = download.resolve, download.refusal_reason
    fake = {
        "public.test": ["127.0.0.1"],
        "other.test": ["127.0.0.1"],
        "mixed.test": ["127.0.0.1", "10.0.0.7"],
    }
    monkeypatch.setattr(download, "resolve", lambda h, p: fake.get(h) or real_resolve(h, p))
    monkeypatch.setattr(
        download, "refusal_reason", lambda ip: None if str(ip) == "127.0.0.1" else real_reason(ip)
    )


def test_connects_to_the_checked_address_with_the_original_host(server: str, public_test) -> None:
    port = server.split(":")[1]
    Handler.hosts.clear()
    assert fetch_url(f"http://public.test:{port}/photo.png", SETTINGS) == PHOTO
    assert Handler.hosts == [f"public.test:{port}"]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for `public.test`; yields its
    port, the certificate (to trust) and the TLS server names clients asked for (SNI)."""
    pytest.importorskip("cryptography")
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "public.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("public.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_names: list = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, server_name, ctx: server_names.append(server_name)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield str(httpd.server_address[1]), cert_file, server_names
    httpd.shutdown()
    httpd.server_close()


def test_https_keeps_the_hostname_for_sni_and_certificate_checks(
    tls_server: tuple[str, Path, list], public_test, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection goes to the checked IP, yet TLS still names and verifies `public.test`."""
    import ssl

    port, cert_file, server_names = tls_server
    trusting = ssl.create_default_context(cafile=str(cert_file))
    monkeypatch.setattr(download, "ssl_context", lambda: trusting)
    Handler.hosts.clear()
    assert fetch_url(f"https://public.test:{port}/photo.png", SETTINGS) == PHOTO
    assert server_names[-1] == "public.test"
    assert Handler.hosts == [f"public.test:{port}"]
    # The same server under a name its certificate does not carry: verification fails.
    message = refused("fetch_failed", fetch_url, f"https://other.test:{port}/photo.png", SETTINGS)
    assert "could not download the image from other.test" in message


def test_every_resolved_address_is_checked(server: str, public_test) -> None:
    port = server.split(":")[1]
    message = refused("invalid_input", fetch_url, f"http://mixed.test:{port}/photo.png", SETTINGS)
    assert "'mixed.test' resolves to a private" in message


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/photo.png",
        "http://10.0.0.1/photo.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/photo.png",
        "file:///etc/passwd",
    ],
)
def test_redirects_are_checked_on_every_hop(server: str, public_test, target: str) -> None:
    port = server.split(":")[1]
    url = f"http://public.test:{port}/redirect?to={target.format(port=port)}"
    Handler.hosts.clear()
    message = refused("invalid_input", fetch_url, url, SETTINGS)
    assert "refused" in message
    assert Handler.hosts == [f"public.test:{port}"]  # the second hop never reached the server


def test_redirect_loop(server: str) -> None:
    assert "redirected more than 5 times" in refused(
        "fetch_failed", fetch_url, f"http://{server}/loop", LOCAL
    )


def test_http_error_status(server: str) -> None:
    message = refused("fetch_failed", fetch_url, f"http://{server}/missing?token=abc", LOCAL)
    assert "HTTP 404" in message and "token" not in message


def test_connection_refused() -> None:
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    message = refused("fetch_failed", fetch_url, f"http://127.0.0.1:{port}/", LOCAL)
    assert "could not download the image from 127.0.0.1" in message


def test_unresolvable_host() -> None:
    message = refused("fetch_failed", fetch_url, "http://no-such-host.invalid/a.png", SETTINGS)
    assert "could not resolve" in message


def test_size_cap_from_content_length(server: str) -> None:
    settings = Settings(allow_private_urls=True, max_download_bytes=len(PHOTO) - 1)
    message = refused("image_too_large", fetch_url, f"http://{server}/photo.png", settings)
    assert f"download limit of {len(PHOTO) - 1} bytes" in message


def test_size_cap_while_streaming(server: str) -> None:
    settings = Settings(allow_private_urls=True, max_download_bytes=1_000_000)
    refused("image_too_large", fetch_url, f"http://{server}/endless", settings)


@pytest.mark.parametrize("path", ["/slow?s=2", "/drip"])
def test_time_cap(server: str, path: str) -> None:
    settings = Settings(allow_private_urls=True, download_timeout_s=0.5)
    # /drip sends a byte every 50 ms, so no single read times out: only the overall cap fires.
    message = refused("fetch_failed", fetch_url, f"http://{server}{path}", settings)
    assert "took longer than 0.5 s" in message


# ---- the request's views ------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_load_single_base64() -> None:
    request = parse_request({"image_base64": "data:image/png;base64," + b64(PHOTO)})
    (view,) = load_request_images(request, SETTINGS)
    assert (view.width, view.height, view.source) == (1208, 680, "image_base64")


def test_load_several_views_in_order(server: str) -> None:
    small = encode(Image.new("RGB", (30, 20), (0, 255, 0)), "JPEG")
    request = parse_request(
        {
            "images": [
                {"url": f"http://{server}/photo.png"},
                {"base64": b64(small)},
                {"url": f"http://{server}/redirect?to=/photo.png"},
            ]
        }
    )
    views = load_request_images(request, LOCAL)
    assert [v.source for v in views] == ["images[0]", "images[1]", "images[2]"]
    assert [v.width for v in views] == [1208, 30, 1208]


def test_load_names_the_failing_view(server: str) -> None:
    request = parse_request(
        {"images": [{"base64": b64(PHOTO)}, {"url": f"http://{server}/missing"}]}
    )
    message = refused("fetch_failed", load_request_images, request, LOCAL)
    assert message.startswith("images[1]: ")
    request = parse_request({"images": [{"base64": b64(PHOTO)}, {"base64": "!!"}]})
    assert refused("invalid_input", load_request_images, request, LOCAL).startswith("images[1]: ")
    request = parse_request({"images": [{"base64": b64(PHOTO)}, {"base64": b64(b"text")}]})
    assert refused("invalid_input", load_request_images, request, LOCAL).startswith("images[1] ")


def test_load_enforces_max_views() -> None:
    request = parse_request({"images": [{"base64": b64(PHOTO)}] * 3})
    assert "at most 2" in refused(
        "invalid_input", load_request_images, request, Settings(max_views=2)
    )
