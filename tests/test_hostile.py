"""Hostile inputs: every one answered fast, with memory bounded by settings, nothing left behind.

Part one checks each rule in process: the denied networks, downloads from a hostile HTTP server
on 127.0.0.1 (encodings, broken redirects, the one deadline, slow DNS), the body's structure
bound, the schema's size caps, the camera validators (with hypothesis: whatever passes gives
finite numbers from every encoder, the point cloud included) and the response boundary (a
non-finite result is `internal`, and what the request saved is removed, bucket included).

Part two (slow) sends every case of `hostile_cases.py` to `da3-serverless serve` and to RunPod's
local API, run as processes, and checks the status, the error code, the time to answer, the
server's peak memory growth, that a failed request left no file, and that a good request
succeeds right after.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import os
import socket
import time
import tracemalloc
import types
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import hostile_cases as hc
from conftest import SMALL_REPO, TEST_API_KEY, examples, offline_settings
from da3_serverless.api import download
from da3_serverless.api.cameras import (
    FOCAL_RANGE,
    MAX_TRANSLATION,
    check_extrinsics,
    check_focal_length,
    check_intrinsics,
)
from da3_serverless.api.download import fetch_url, refusal_reason
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.images import decode_base64
from da3_serverless.api.schema import OUTPUT_NAMES, parse_request
from da3_serverless.config import Settings
from da3_serverless.exports import encoding
from da3_serverless.inference.prediction import Prediction
from da3_serverless.server import create_app
from da3_serverless.server.body import check_structure, json_depth, max_json_structure
from da3_serverless.service import Service
from servers import app_in_thread, eventually, free_port, runpod_local_process, serve_process


def refused(code: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ServiceError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value.message


# ---- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "what"),
    [
        ("::7f00:1", "IPv4-compatible"),
        ("::a9fe:a9fe", "IPv4-compatible"),
        ("::ffff:0:7f00:1", "IPv4-translated"),
        ("::ffff:8.8.8.8", "IPv4-mapped"),
        ("64:ff9b::808:808", "NAT64"),
        ("64:ff9b:1::a00:1", "NAT64"),
        ("fec0::1", "site-local"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ("2002:7f00:1::1", "loopback address inside a 6to4"),
        ("2002:a9fe:a9fe::", "metadata address inside a 6to4"),
        ("100::1", "discard"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        ("5f00::1", "SRv6"),
        ("4000::1", "outside the global unicast range"),
        ("192.0.0.8", "IETF"),
        ("198.18.0.1", "benchmarking"),
        ("203.0.113.7", "documentation"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.100.100.200", "metadata"),
        ("0.1.2.3", "unspecified"),
    ],
)
def test_denied_networks(address: str, what: str) -> None:
    reason = refusal_reason(ipaddress.ip_address(address))
    assert reason is not None and what in reason, reason


PUBLIC = ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "2a00:1450:4001::200e", "2002:808:808::"]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "host", ["[::7f00:1]", "[::ffff:0:7f00:1]", "[64:ff9b:1::7f00:1]", "[fec0::1]", "0x7f.1"]
)
def test_literal_hosts_are_refused_before_any_connection(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not connect")

    monkeypatch.setattr(download._DeadlineBackend, "connect_tcp", no_connect)
    message = refused("invalid_input", fetch_url, f"http://{host}:8080/x.png", Settings())
    assert "refused" in message


# ---- downloads from a hostile server -------------------------------------------------------

LIMIT = 8_000_000
LOCAL = Settings(allow_private_urls=True, download_timeout_s=2.0, max_download_bytes=LIMIT)


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    with hc.serve_hostile() as url:
        yield url


def traced_peak(fn, *args) -> tuple[object, int]:
    """(`fn`'s result or the ServiceError it raised, peak bytes Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        result = fn(*args)
    except ServiceError as error:
        result = error
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, peak


def test_stacked_encodings_are_refused_without_decoding(hostile: str) -> None:
    hc.stacked_gzip_bomb()  # built before measuring
    error, peak = traced_peak(fetch_url, f"{hostile}/gzip-stacked", LOCAL)
    assert isinstance(error, ServiceError) and error.code == "fetch_failed"
    assert "'gzip, gzip, gzip'" in error.message and "at most one gzip" in error.message
    assert peak < 1_000_000


def test_one_gzip_layer_is_decoded_within_the_cap(hostile: str) -> None:
    assert fetch_url(f"{hostile}/photo.png.gz", LOCAL) == hc.small_photo()
    assert fetch_url(f"{hostile}/photo.png.deflate", LOCAL) == hc.small_photo()
    hc.gzip_bomb()
    error, peak = traced_peak(fetch_url, f"{hostile}/gzip-bomb", LOCAL)
    assert isinstance(error, ServiceError) and error.code == "image_too_large"
    assert peak < 1.5 * LIMIT  # the GiB behind it was never inflated


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/gzip-truncated", "ended early"),
        ("/brotli", "Content-Encoding 'br'"),
        ("/redirect-without-location", "without a Location"),
        ("/redirect-malformed", "malformed Location"),
        ("/redirect-no-host", "malformed Location"),
    ],
)
def test_broken_bodies_and_redirects_are_fetch_failed(
    hostile: str, path: str, fragment: str
) -> None:
    assert fragment in refused("fetch_failed", fetch_url, hostile + path, LOCAL)


def test_one_deadline_for_the_whole_download(hostile: str) -> None:
    """A byte arrives just before the deadline, then nothing: the next read gets only the time
    left, so the download ends at the deadline, not a read timeout later."""
    settings = Settings(allow_private_urls=True, download_timeout_s=1.0)
    start = time.monotonic()
    message = refused("fetch_failed", fetch_url, f"{hostile}/stall?after=0.8", settings)
    assert "took longer than 1 s" in message
    assert time.monotonic() - start < 1.6


def test_dns_is_bounded_by_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_dns(host: str, port: int) -> list[str]:
        time.sleep(3)
        return ["93.184.215.14"]

    monkeypatch.setattr(download, "resolve", slow_dns)
    start = time.monotonic()
    message = refused(
        "fetch_failed", fetch_url, "http://slow.test/a.png", Settings(download_timeout_s=0.5)
    )
    assert "took longer than 0.5 s" in message and time.monotonic() - start < 1.5


# ---- the body's structure ----------------------------------------------------------------


def largest_real_request(views: int) -> bytes:
    """A request as large in structure as a real one gets: every field, `views` views with a
    data URI or a URL each, one intrinsics and a 4x4 extrinsics per view, in RunPod's form."""
    k = [[1000.5, 0.0, 640.25], [0.0, 1000.5, 360.75], [0.0, 0.0, 1.0]]
    e = [[1.0, 0.0, 0.0, 0.125], [0.0, 1.0, 0.0, -2.5], [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 1]]
    images = [{"base64": "data:image/png;base64,iVBORw0KGgo="}, {"url": "https://x.test/a,b.png"}]
    request = {
        "api_key": "k", "images": (images * views)[:views], "model_id": "da3-small",
        "output_metric": True, "use_ray_pose": False, "process_res": 504,
        "focal_length_px": 1000.0, "intrinsics": [k] * views, "extrinsics": [e] * views,
        "outputs": ["depth", "preview", "confidence", "sky_mask", "depth_npy", "pointcloud"],
        "return_base64": True,
    }  # fmt: skip
    return json.dumps({"input": request}).encode()


@pytest.mark.parametrize("views", [1, 16, 64])
def test_real_requests_pass_the_structure_bound(views: int) -> None:
    body = largest_real_request(views)
    check_structure(body, max_json_structure(views))
    assert json_depth(body) == 5


@pytest.mark.parametrize(
    "body",
    [hc.tiny_objects_body(30_000_000), b'{"outputs": [' + b'"x",' * 3000 + b'"x"]}', b"[" * 9],
    ids=["30 MB of objects", "3000 strings", "nested 9 deep"],
)
def test_bodies_past_the_structure_bound_are_refused_fast(body: bytes) -> None:
    start = time.monotonic()
    message = refused("image_too_large", check_structure, body, max_json_structure(16))
    assert "send one request object" in message
    assert time.monotonic() - start < 2.0  # counting, not parsing (generous)


def test_depth_skips_strings_and_escapes() -> None:
    assert json_depth(b'{"api_key": "[[[[[[[[[[{{{{", "a": "\\"[[[", "b": "\\\\"}') == 1
    assert json_depth(b'[["\\\\\\"]]]]]]"]]') == 2
    assert json_depth(b'"unterminated [[[[') == 0


def test_an_empty_body_key_counts_as_absent_and_a_body_key_wins() -> None:
    service = types.SimpleNamespace(settings=Settings(api_key="right-key"))
    request = {"image_url": "https://x.test/a.png"}
    Service.authorize(service, {**request, "api_key": ""}, "right-key")
    message = refused(
        "unauthorized", Service.authorize, service, {**request, "api_key": "wrong"}, "right-key"
    )
    assert "wrong API key" in message


# ---- the schema's size caps ---------------------------------------------------------------


def small_request(**fields: object) -> dict:
    return {"image_base64": "iVBORw0KGgo=", **fields}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"outputs": ["none"] * 1_000_000}, "outputs has 1000000 entries"),
        ({"outputs": ["depth"] * (len(OUTPUT_NAMES) + 1)}, "name each at most once"),
        ({"images": [{"base64": "x"}] * 100_000, "image_base64": None}, "at most 16"),
        ({"intrinsics": [[[1.0] * 3] * 3] * 1000}, "intrinsics must be one matrix per view"),
        ({"intrinsics": [[1.0] * 1_000_000, [1.0] * 3, [0.0, 0.0, 1.0]]}, "at most 4 numbers"),
        ({"extrinsics": [[[[[1.0]]]]]}, "extrinsics must be one matrix per view"),
        ({f"f{n}": 0 for n in range(100_000)}, "the request has 100001 fields"),
        ({"image_url": "https://x.test/" + "a" * 20_000, "image_base64": None}, "at most 8192"),
        ({"model_id": "m" * 10_000}, "model_id is 10000 characters long"),
    ],
    ids=[
        "1M outputs",
        "one output too many",
        "100k views",
        "1000 matrices",
        "1M columns",
        "5 levels",
        "100k fields",
        "long URL",
        "long model_id",
    ],
)
def test_every_list_and_string_is_capped_before_pydantic(fields: dict, fragment: str) -> None:
    payload = {k: v for k, v in small_request(**fields).items() if v is not None}
    start = time.monotonic()
    error, peak = traced_peak(parse_request, payload, Settings())
    assert isinstance(error, ServiceError) and error.code == "invalid_input", error
    assert fragment in error.message, error.message
    assert time.monotonic() - start < 0.5 and peak < 1_000_000
    assert len(error.message) < 2000


def test_base64_is_capped_by_its_encoded_length() -> None:
    settings = Settings(max_download_bytes=3000)
    photo = base64.encodebytes(os.urandom(3000)).decode()  # wrapped at 76 columns
    parse_request({"image_base64": "data:image/jpeg;base64," + photo}, settings)
    for text in (" " * (settings.base64_chars_limit + 1), "A" * 10_000_000):
        message = refused("image_too_large", parse_request, {"image_base64": text}, settings)
        assert "MAX_BASE64_CHARS" in message
    views = {"images": [{"base64": "A" * 6000}]}
    assert "images[0].base64" in refused("image_too_large", parse_request, views, settings)
    assert Settings(max_base64_chars=10).base64_chars_limit == 10


# Base64 text of 15 MB: 10 million "AB" pairs (20 MB), or each followed by a line break (30 MB).
BIG_BASE64 = {"clean": "AB" * 10_000_000, "newlines": "AB\n" * 10_000_000}


@pytest.mark.parametrize("kind", sorted(BIG_BASE64))
def test_decoding_base64_adds_about_one_decoded_copy(kind: str) -> None:
    text = BIG_BASE64[kind]
    decoded, peak = traced_peak(decode_base64, text)
    assert isinstance(decoded, bytes) and len(decoded) == 15_000_000
    assert decoded[:3] == base64.b64decode("ABAB")
    # The result with its buffer's growth room (an eighth), and a few 1 MB chunks.
    assert peak < 1.25 * len(decoded) + 4_000_000


@pytest.mark.slow  # 40 MB bodies through a real server, traced
@pytest.mark.parametrize("kind", sorted(BIG_BASE64))
def test_a_30_mb_base64_request_costs_at_most_4x_its_body(kind: str, hf_cache, tmp_path) -> None:
    """Counting the buffered body, the parsed JSON and the decoding (the text is no image:
    400 once decoded)."""
    body = json.dumps({"input": {"image_base64": BIG_BASE64[kind]}}).encode()
    service = Service(offline_settings(hf_cache, tmp_path, warmup=False))
    headers = {"X-API-Key": TEST_API_KEY, "Content-Type": "application/json"}
    with app_in_thread(create_app(service.settings, service)) as url:
        answer, peak = traced_peak(
            lambda: httpx.post(f"{url}/runsync", content=body, headers=headers, timeout=120)
        )
    assert answer.status_code == 400, answer.text
    assert json.loads(answer.json()["error"])["code"] == "invalid_input"  # RunPod's form
    assert peak < 4 * len(body), f"{peak / 1e6:.0f} MB for a {len(body) / 1e6:.0f} MB body"


# ---- camera numbers -----------------------------------------------------------------------

SIZE = (151, 85)
K_OK = [[120.0, 0.0, 75.0], [0.0, 120.0, 42.0], [0.0, 0.0, 1.0]]


def k_with(**entries: float) -> list[list[float]]:
    k = [row[:] for row in K_OK]
    for name, value in entries.items():
        row, col = int(name[1]), int(name[2])
        k[row][col] = value
    return k


@pytest.mark.parametrize(
    ("k", "fragment"),
    [
        (k_with(k00=1e39), "not finite as float32"),
        (k_with(k00=1e-300), "focal length fx"),
        (k_with(k00=0.0), "focal length fx"),
        (k_with(k11=-120.0), "focal length fy"),
        (k_with(k11=3100.0), "focal length fy"),
        (k_with(k01=120.0, k10=120.0), "not a pinhole matrix"),
        (k_with(k10=1.0), "not a pinhole matrix"),
        (k_with(k20=1.0), "last row must be [0, 0, 1]"),
        (k_with(k02=1e7), "principal point"),
        (k_with(k12=-100.0), "principal point"),
    ],
)
def test_intrinsics_rules(k: list, fragment: str) -> None:
    message = refused("invalid_input", check_intrinsics, [k], [SIZE])
    assert message.startswith("intrinsics[0]") and fragment in message


def test_focal_length_rules() -> None:
    check_focal_length(500.0, [SIZE, (4096, 4096)])
    assert "not finite" in refused("invalid_input", check_focal_length, 1e39, [SIZE])
    assert "view 1" in refused("invalid_input", check_focal_length, 4000.0, [(2000, 10), SIZE])
    check_focal_length([500.0, 3000.0], [SIZE, (4096, 4096)])  # one per view, each its own
    message = refused("invalid_input", check_focal_length, [500.0, 3100.0], [(4096, 4096), SIZE])
    assert message.startswith("focal_length_px[1] 3100") and "view 1 (151x85)" in message


def rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda r: r * 1.01, "not a rigid transform"),
        (lambda r: r @ np.diag([1.0, 1.0, -1.0]), "negative determinant"),
        (lambda r: r + np.array([[0, 0.01, 0], [0, 0, 0], [0, 0, 0]]), "not a rigid transform"),
        (lambda r: np.zeros((3, 3)), "not a rigid transform"),
    ],
    ids=["scaled", "reflection", "sheared", "zero"],
)
def test_extrinsics_rules(change, fragment: str) -> None:
    r = change(rotation(np.random.default_rng(0)))
    pose = np.hstack([r, [[1.0], [2.0], [3.0]]])
    assert fragment in refused("invalid_input", check_extrinsics, [pose.tolist()])
    far = np.hstack([rotation(np.random.default_rng(1)), [[MAX_TRANSLATION * 2], [0], [0]]])
    assert "translation" in refused("invalid_input", check_extrinsics, [far.tolist()])
    overflow = np.hstack([np.eye(3), [[1e39], [0], [0]]])
    assert "not finite" in refused("invalid_input", check_extrinsics, [overflow.tolist()])


def test_nearly_rigid_rotations_are_reorthonormalised() -> None:
    rng = np.random.default_rng(2)
    r = rotation(rng) + rng.uniform(-2e-4, 2e-4, (3, 3))
    (pose,) = check_extrinsics([np.hstack([r, [[1.0], [2.0], [3.0]]]).tolist()])
    fixed = pose[:, :3]
    np.testing.assert_allclose(fixed.T @ fixed, np.eye(3), atol=1e-12)
    assert np.linalg.det(fixed) == pytest.approx(1.0) and np.abs(fixed - r).max() < 1e-3
    np.testing.assert_array_equal(pose[:, 3], [1.0, 2.0, 3.0])


def finite_outputs(depth: np.ndarray, k: np.ndarray, pose: np.ndarray | None) -> None:
    """Every output kind of a view, from the encoders: its numbers are all finite."""
    png = encoding.encode_depth_png16(depth)
    assert math.isfinite(png.min_depth) and math.isfinite(png.max_depth)
    assert encoding.decode_depth_png16(png.png).shape == depth.shape
    for data in (encoding.encode_preview(depth), encoding.encode_confidence(depth),
                 encoding.encode_sky_mask(depth)):  # fmt: skip
        assert Image.open(BytesIO(data)).size == depth.shape[::-1]
    assert np.load(BytesIO(encoding.encode_npy(depth))).shape == depth.shape
    rgb = np.zeros((*depth.shape, 3), np.uint8)
    ply = encoding.encode_pointcloud_ply(depth, k, rgb, pose)
    body = ply[ply.index(b"end_header\n") + len(b"end_header\n") :]
    points = np.frombuffer(body, dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)])
    assert np.isfinite(points["xyz"]).all()
    assert np.isfinite(k).all() and (pose is None or np.isfinite(pose).all())
    json.dumps({"intrinsics": k.tolist(), "extrinsics": None if pose is None else pose.tolist()},
               allow_nan=False)  # fmt: skip


SIZES = st.tuples(st.integers(1, 64), st.integers(1, 64))
# Numbers a client could send: anything finite in JSON, tiny and huge included.
NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(-1e3, 1e3),
    st.sampled_from([0.0, 1.0, -1.0, 1e-300, 1e38, 3.5e38, 1e39]),
)
DEPTHS = st.floats(-1.0, 1e6, width=32) | st.sampled_from([np.nan, np.inf, -np.inf, 0.0])


@st.composite
def plausible_intrinsics(draw, size: tuple[int, int]) -> list[list[float]]:
    """Mostly within the rules, sometimes just outside them."""
    width, height = size
    side = max(width, height)
    focal = st.floats(FOCAL_RANGE[0] * side * 0.9, FOCAL_RANGE[1] * side * 1.1)
    fx, fy = draw(focal), draw(focal)
    cx = draw(st.floats(-1.1 * width, 2.1 * width))
    cy = draw(st.floats(-1.1 * height, 2.1 * height))
    skew = draw(st.sampled_from([0.0] * 8 + [1e-7, 0.5]))
    return [[fx, skew, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]


@st.composite
def plausible_pose(draw) -> list[list[float]]:
    seed = draw(st.integers(0, 2**32 - 1))
    r = rotation(np.random.default_rng(seed))
    noise = draw(st.sampled_from([0.0, 0.0, 1e-5, 3e-4, 1e-2]))
    r = r + np.random.default_rng(seed + 1).uniform(-noise, noise, (3, 3))
    near, far = st.floats(-10, 10), st.floats(-1e13, 1e13)
    t = draw(st.lists(st.one_of(near, near, near, far), min_size=3, max_size=3))
    return np.hstack([r, np.array(t)[:, None]]).tolist()


@st.composite
def camera_cases(draw):
    """(size, intrinsics, pose or None, depth): mostly plausible cameras near the rules' edges,
    sometimes any numbers at all; depth maps with NaN, infinities, zeros and negatives."""
    size = draw(SIZES)
    anything = st.lists(st.lists(NUMBERS, min_size=3, max_size=3), min_size=3, max_size=3)
    k = draw(anything if draw(st.integers(0, 4)) == 0 else plausible_intrinsics(size))
    which = draw(st.integers(0, 7))
    if which < 2:
        pose = None
    elif which == 2:
        pose = draw(st.lists(st.lists(NUMBERS, min_size=4, max_size=4), min_size=3, max_size=3))
    else:
        pose = draw(plausible_pose())
    depth = draw(hnp.arrays(np.float32, (size[1], size[0]), elements=DEPTHS))
    return size, k, pose, depth


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(camera_cases())
def test_any_camera_that_passes_gives_finite_outputs(case) -> None:
    size, k, pose, depth = case
    try:
        (checked_k,) = check_intrinsics([k], [size])
        checked_pose = None if pose is None else check_extrinsics([pose])[0]
    except ServiceError as error:
        assert error.code == "invalid_input" and error.message.startswith(("intrinsics", "extr"))
        return
    finite_outputs(depth, checked_k, checked_pose)


@settings(max_examples=examples(100), deadline=None)
@given(SIZES.flatmap(lambda size: st.tuples(st.just(size), plausible_intrinsics(size))))
def test_intrinsics_within_the_rules_pass_as_exact_pinholes(case) -> None:
    (width, height), k = case
    side = max(width, height)
    inside = (
        all(FOCAL_RANGE[0] * side <= f <= FOCAL_RANGE[1] * side for f in (k[0][0], k[1][1]))
        and -width <= k[0][2] <= 2 * width and -height <= k[1][2] <= 2 * height
        and k[0][1] <= 1e-6
    )  # fmt: skip
    if not inside:
        refused("invalid_input", check_intrinsics, [k], [(width, height)])
        return
    (checked,) = check_intrinsics([k], [(width, height)])
    assert checked[0, 1] == checked[1, 0] == 0.0 and checked[2].tolist() == [0.0, 0.0, 1.0]


# ---- the response boundary: never non-finite, nothing left behind --------------------------


@pytest.fixture(scope="module")
def bucket_service(hf_cache, s3_endpoint, tmp_path_factory) -> Iterator[tuple[Service, object]]:
    """A real service (random da3-small) that uploads outputs to a bucket on moto's S3."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="secret", region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="outputs")
    workspace = tmp_path_factory.mktemp("workspace")
    service = Service(offline_settings(
        hf_cache, workspace, warmup=False, bucket_endpoint_url=f"{s3_endpoint}/outputs",
        bucket_access_key_id="testing", bucket_secret_access_key="secret",
    ))  # fmt: skip
    service.start()
    yield service, s3


def bucket_keys(s3) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket="outputs").get("Contents", [])]


def test_a_non_finite_result_is_internal_and_leaves_nothing_behind(
    bucket_service, monkeypatch, caplog
):
    service, s3 = bucket_service
    request = {"api_key": TEST_API_KEY, "image_base64": hc.b64(hc.small_photo()),
               "process_res": hc.PROCESS_RES, "return_base64": False,
               "outputs": ["depth", "preview", "depth_npy"]}  # fmt: skip
    ok = service.handle(request)
    assert ok["preview"]["url"] and Path(ok["file_path"]).is_file()
    files, keys = sorted(service.settings.output_dir.iterdir()), bucket_keys(s3)
    assert len(keys) == 3  # depth, preview and depth_npy, none inline
    predictor = service.model_cache.get(SMALL_REPO)
    real_predict = predictor.predict

    def broken_camera(*args, **kwargs) -> Prediction:
        prediction = real_predict(*args, **kwargs)
        prediction.intrinsics[0, 0, 0] = np.inf
        return prediction

    monkeypatch.setattr(predictor, "predict", broken_camera)
    message = refused("internal", service.handle, request)
    assert "non-finite number (at response.intrinsics[0][0])" in message
    assert "non-finite number inf at response.intrinsics[0][0]" in caplog.text
    assert sorted(service.settings.output_dir.iterdir()) == files
    assert bucket_keys(s3) == keys
    monkeypatch.undo()
    assert service.handle(request)["schema_version"] == "1"


def test_a_result_nobody_receives_is_discarded_from_the_volume_and_the_bucket(bucket_service):
    """What a job cancelled past its last check does with its result: every file and bucket
    object the request saved goes, not only the ones a response names by path."""
    service, s3 = bucket_service
    before_files = sorted(service.settings.output_dir.iterdir())
    before_keys = bucket_keys(s3)
    request = {"api_key": TEST_API_KEY, "image_base64": hc.b64(hc.small_photo()),
               "process_res": hc.PROCESS_RES, "return_base64": False,
               "outputs": ["depth", "preview", "depth_npy"]}  # fmt: skip
    late = service.handle(request)
    assert late["preview"]["url"] and Path(late["file_path"]).is_file()
    assert len(bucket_keys(s3)) == len(before_keys) + 3
    service.discard(late)
    assert sorted(service.settings.output_dir.iterdir()) == before_files
    assert bucket_keys(s3) == before_keys


class NonFiniteService:
    """Stands in for `Service`: the real key and request checks, then a result JSON cannot
    carry (as a bug would give)."""

    authorize = Service.authorize
    model_key = Service.model_key
    batch_key = Service.batch_key
    default_model_id = Service.default_model_id
    ready = True
    waiting_for_memory = 0

    def __init__(self, **settings: object) -> None:
        self.settings = Settings(api_key=TEST_API_KEY, model_id=SMALL_REPO, **settings)

    def start(self) -> None:
        pass

    def model_table(self) -> list[dict]:
        return []

    def handle(
        self, payload: object, api_key: str | None = None, cancel: object = None, job: object = None
    ) -> dict:
        return {"schema_version": "1", "width": 2, "height": 1, "min_depth": float("nan")}

    def handle_batch(self, items: list[tuple[object, str | None, object]]) -> list[dict]:
        return [self.handle(payload, api_key, cancel) for payload, api_key, cancel, *_ in items]


def test_the_server_never_answers_what_json_cannot_carry() -> None:
    """/runsync and /run + /status answer the same `internal` error object."""
    service = NonFiniteService()
    headers = {"X-API-Key": TEST_API_KEY}
    request = {"image_url": "https://x.test/a.png"}
    with app_in_thread(create_app(service.settings, service)) as url:
        sync = httpx.post(f"{url}/runsync", json=request, headers=headers)
        assert sync.status_code == 500 and sync.json()["error"]["code"] == "internal"
        assert "response.min_depth" in sync.json()["error"]["message"]
        job = httpx.post(f"{url}/run", json=request, headers=headers).json()["id"]
        status = f"{url}/status/{job}"
        eventually(lambda: httpx.get(status, headers=headers).json()["status"] == "FAILED")
        polled = httpx.get(status, headers=headers)
        assert polled.status_code == 200
        assert json.loads(polled.json()["error"])["code"] == "internal"


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    service = NonFiniteService(body_timeout_s=0.5)
    with app_in_thread(create_app(service.settings, service)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /runsync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 1000\r\n\r\n{\"image_url\": ")  # fmt: skip
            start = time.monotonic()
            answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and "BODY_TIMEOUT_S" in answer
        assert time.monotonic() - start < 5


# ---- every case against the running servers ------------------------------------------------

MEMORY_BOUND_MB = 250  # generous: the settings bound every case far below (before: up to +2 GB)
SECONDS = {"downloads": hc.DOWNLOAD_TIMEOUT_S + 5, "addresses": 10, "parsing": 15,
           "images": 30, "cameras": 30}  # fmt: skip


@pytest.fixture(scope="module")
def hostile_env(hf_cache, tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DA3_", "HF_", "RUNPOD"))}
    env.update(HF_HOME=str(hf_cache), HF_HUB_OFFLINE="1", MODEL_ID=SMALL_REPO,
               DA3_API_KEY=TEST_API_KEY, DA3_DEVICE="cpu", PYTHONUNBUFFERED="1",
               **hc.server_settings_env())  # fmt: skip
    return env


def _server(kind: str, env: dict[str, str], folder: Path):
    env = {**env, "WORKSPACE": str(folder / "workspace"),
           "RUNPOD_VOLUME": str(folder / "no-volume"),
           "DA3_ALLOW_PRIVATE_URLS": "0" if kind == "strict" else "1"}  # fmt: skip
    if kind == "runpod":
        return runpod_local_process(env, folder / "server.log")
    return serve_process(env, folder / "server.log")


@pytest.fixture(scope="module", params=["http", "strict", "runpod"])
def target(request, hostile_env, tmp_path_factory, hostile):
    """(kind, URL, pid, output folder) of a running server."""
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    with _server(kind, hostile_env, folder) as (url, process):
        yield kind, url, process.pid, folder / "workspace" / "output_images"


def cases_for(kind: str) -> list[hc.Case]:
    return [
        c for c in hc.CASES if c.strict == (kind == "strict") and (kind != "runpod" or c.runpod)
    ]


def outputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.slow
def test_every_hostile_case(target, hostile) -> None:
    kind, url, pid, folder = target
    ctx = hc.Context(TEST_API_KEY, hostile, port=free_port())
    good = hc.Case("good", "", hc.good_request, 200, None)
    failures = []
    for case in cases_for(kind):
        before = outputs(folder)
        answer = hc.measure(case, url, pid, ctx, runpod=kind == "runpod")
        left = outputs(folder) - before
        after = hc.measure(good, url, pid, ctx, runpod=kind == "runpod")
        checks = {
            f"answered {answer.status} {answer.code}": (answer.status, answer.code)
            == case.expected(kind == "runpod"),
            f"took {answer.seconds:.1f} s": answer.seconds <= SECONDS[case.group],
            f"grew {answer.growth_mb:.0f} MB": answer.growth_mb <= MEMORY_BOUND_MB,
            f"left {sorted(left)} behind": answer.code is None or not left,
            f"/status answered {answer.http_statuses}": not case.run
            or set(answer.http_statuses) == {200},
            f"then a good request answered {after.status} {after.code}": after.status == 200,
        }
        problems = [what for what, ok in checks.items() if not ok]
        if problems:
            failures.append(f"{case.name}: {', '.join(problems)}")
    assert not failures, "\n".join(failures)
    cameras = hc.Case("good, with cameras", "", hc.good_camera_request, 200, None)
    assert hc.measure(cameras, url, pid, ctx, runpod=kind == "runpod").status == 200
