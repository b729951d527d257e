"""Property tests: hostile input only ever produces a ServiceError."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from conftest import examples
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.images import decode_image
from da3_serverless.api.schema import RunRequest, parse_request
from da3_serverless.config import Settings
from da3_serverless.exports.encoding import decode_depth_png16, encode_depth_png16
from paths import IMAGES

SETTINGS = Settings(max_image_side=512)
FIELDS = [*RunRequest.model_fields, "imagee_url", "input"]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(["url", "base64", "x", *FIELDS]), children, max_size=4)
    ),
    max_leaves=30,
)
payloads = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8) | json_values


@given(payloads)
@settings(max_examples=examples(400), suppress_health_check=[HealthCheck.too_slow])
def test_parse_request_only_raises_service_error(payload: object) -> None:
    try:
        request = parse_request(payload, Settings())
    except ServiceError as exc:
        assert exc.code == "invalid_input" and exc.message
    else:
        assert isinstance(request, RunRequest) and request.view_count >= 1


def _sample(fmt: str, mode: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt)
    return out.getvalue()


SAMPLES = [
    _sample("PNG", "RGB"),
    _sample("PNG", "P"),
    _sample("JPEG", "RGB"),
    _sample("GIF", "P"),
    _sample("WEBP", "RGB"),
    _sample("TIFF", "RGB"),
    _sample("BMP", "RGB"),
    (IMAGES / "soh-000.png").read_bytes()[:4000],
]


def _check(data: bytes) -> None:
    try:
        decoded = decode_image(data, SETTINGS)
    except ServiceError as exc:
        assert exc.code in ("invalid_input", "image_too_large")
    else:
        assert decoded.image.mode == "RGB"
        assert decoded.image.size == (decoded.width, decoded.height)
        assert max(decoded.width, decoded.height) <= SETTINGS.max_image_side


@given(st.binary(max_size=2000))
@settings(max_examples=examples(300))
def test_decode_image_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 10**6),
)
@settings(max_examples=examples(400), suppress_health_check=[HealthCheck.too_slow])
def test_decode_image_mutated_real_files(sample: bytes, edits: list, cut: int) -> None:
    data = bytearray(sample)
    for position, value in edits:
        data[position % len(data)] = value
    _check(bytes(data[: max(1, len(data) - cut % len(data))]))


@given(
    arrays(
        np.float32,
        array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e6, 1e6, width=32),
    )
)
@settings(max_examples=examples(200))
def test_depth_png16_round_trip(depth: np.ndarray) -> None:
    encoded = encode_depth_png16(depth)
    back = decode_depth_png16(encoded.png)
    step = (encoded.max_depth - encoded.min_depth) / 65535
    eps = 4 * np.finfo(np.float32).eps * max(abs(encoded.min_depth), abs(encoded.max_depth), 1e-30)
    assert np.abs(back.astype(np.float64) - depth).max() <= step + eps
