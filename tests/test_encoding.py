"""Output encodings: 16-bit depth PNG round trips (read back by Pillow), previews, masks, .npy and
PLY point clouds (checked against the reference implementation's unprojection)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from da3_serverless.exports.encoding import (
    COLORMAP,
    DEPTH_ENCODING,
    decode_depth_png16,
    encode_confidence,
    encode_depth_png16,
    encode_npy,
    encode_pointcloud_ply,
    encode_preview,
    encode_sky_mask,
    write_png,
)

RNG = np.random.default_rng(0)


def open_png(data: bytes) -> Image.Image:
    image = Image.open(BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


# ---- write_png ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (13, 17)])
@pytest.mark.parametrize("kind", ["gray8", "gray16", "rgb8"])
def test_write_png_is_read_back_exactly_by_pillow(shape: tuple[int, int], kind: str) -> None:
    if kind == "gray16":
        pixels = RNG.integers(0, 65536, shape, dtype=np.uint16)
    elif kind == "gray8":
        pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
    else:
        pixels = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    image = open_png(write_png(pixels, {"key": "value"}))
    assert image.mode == {"gray8": "L", "gray16": "I;16", "rgb8": "RGB"}[kind]
    assert image.text == {"key": "value"}
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_write_png_byte_order() -> None:
    # 0x0102 must read back as 258, not 513: PNG is big-endian, numpy here little-endian.
    pixels = np.array([[0x0102, 0x00FF], [0xFF00, 0xFFFF]], dtype=np.uint16)
    np.testing.assert_array_equal(np.asarray(open_png(write_png(pixels))), pixels)
    np.testing.assert_array_equal(np.asarray(open_png(write_png(pixels.astype(">u2")))), pixels)


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((2, 2), np.float32), np.zeros((2, 2, 4), np.uint8), np.zeros(4, np.uint8)],
)
def test_write_png_refuses_other_arrays(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="cannot write"):
        write_png(pixels)


# ---- depth PNG ----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-3, 1.0, 80.0, 1e4])
def test_depth_round_trip_error_is_below_one_step(scale: float) -> None:
    depth = (RNG.random((61, 83)) * scale + scale * 0.1).astype(np.float32)
    encoded = encode_depth_png16(depth)
    assert encoded.min_depth == float(depth.min()) and encoded.max_depth == float(depth.max())
    back = decode_depth_png16(encoded.png)
    assert back.dtype == np.float32 and back.shape == depth.shape
    step = (encoded.max_depth - encoded.min_depth) / 65535
    assert np.abs(back - depth).max() <= step / 2 + 4 * np.finfo(np.float32).eps * depth.max()


def readme_decode(png: bytes, min_depth: float, max_depth: float) -> np.ndarray:
    """The README's decode, by hand on what Pillow reads, in float64."""
    v = np.asarray(open_png(png)).astype(np.float64)
    return min_depth + v * (max_depth - min_depth) / 65535


@pytest.mark.parametrize("seed", range(8))
def test_readme_decode_is_within_half_a_step_of_depth_npy(seed: int) -> None:
    """Over random depth ranges from 1e-4 to 1e4 m, spans down to float32's resolution (a few
    float32 steps) and up to 100x the near depth. Tolerance: the half step plus the float64
    rounding of the decode itself (4 ulp of the depth)."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        near = 10 ** rng.uniform(-4, 4)
        span = near * 10 ** rng.uniform(-7.5, 2)
        depth = (near + rng.random((17, 23)) * span).astype(np.float32)
        encoded = encode_depth_png16(depth)
        lo, hi = encoded.min_depth, encoded.max_depth
        error = np.abs(readme_decode(encoded.png, lo, hi) - depth.astype(np.float64))
        bound = (hi - lo) / 131070 + 4 * np.spacing(np.float64(hi))
        assert error.max() <= bound, (near, span, error.max() / ((hi - lo) / 131070))


def test_depth_png_values_and_text_chunks() -> None:
    depth = np.array([[1.0, 2.0], [3.0, 5.0]], dtype=np.float32)
    encoded = encode_depth_png16(depth, units="relative")
    image = open_png(encoded.png)
    assert image.mode == "I;16" and image.size == (2, 1 * 2)
    # v = round((d - min) / (max - min) * 65535)
    np.testing.assert_array_equal(np.asarray(image), [[0, 16384], [32768, 65535]])
    assert image.text == {
        "min_depth": "1.0",
        "max_depth": "5.0",
        "units": "relative",
        "depth_encoding": DEPTH_ENCODING,
    }
    # The documented formula, applied by hand to what Pillow reads.
    v = np.asarray(image).astype(np.float64)
    manual = encoded.min_depth + v * (encoded.max_depth - encoded.min_depth) / 65535
    np.testing.assert_allclose(manual, depth, atol=4 / 65535 / 2)


def test_every_code_maps_to_itself() -> None:
    codes = np.arange(65536, dtype=np.float32).reshape(256, 256)
    encoded = encode_depth_png16(codes)
    np.testing.assert_array_equal(np.asarray(open_png(encoded.png)), codes.astype(np.uint16))
    np.testing.assert_array_equal(decode_depth_png16(encoded.png), codes)


def test_constant_depth() -> None:
    encoded = encode_depth_png16(np.full((4, 5), 7.25, np.float32))
    assert encoded.min_depth == encoded.max_depth == 7.25
    assert not np.asarray(open_png(encoded.png)).any()
    np.testing.assert_array_equal(decode_depth_png16(encoded.png), np.full((4, 5), 7.25))


def test_non_finite_depth() -> None:
    depth = np.array([[1.0, np.nan, 3.0], [np.inf, -np.inf, 2.0]], dtype=np.float32)
    encoded = encode_depth_png16(depth)
    assert (encoded.min_depth, encoded.max_depth) == (1.0, 3.0)
    np.testing.assert_array_equal(
        np.asarray(open_png(encoded.png)), [[0, 0, 65535], [65535, 0, 32768]]
    )
    back = decode_depth_png16(encoded.png)
    np.testing.assert_allclose(back, [[1.0, 1.0, 3.0], [3.0, 1.0, 2.0]], atol=1e-4)


def test_all_invalid_depth() -> None:
    encoded = encode_depth_png16(np.full((3, 3), np.nan, np.float32))
    assert (encoded.min_depth, encoded.max_depth) == (0.0, 0.0)
    np.testing.assert_array_equal(decode_depth_png16(encoded.png), np.zeros((3, 3)))


def test_decode_with_explicit_range_and_without_chunks() -> None:
    codes = np.array([[0, 65535]], dtype=np.uint16)
    plain = BytesIO()
    Image.fromarray(codes).save(plain, "PNG")  # no text chunks
    with pytest.raises(ValueError, match="min_depth"):
        decode_depth_png16(plain.getvalue())
    np.testing.assert_allclose(decode_depth_png16(plain.getvalue(), 2.0, 4.0), [[2.0, 4.0]])
    encoded = encode_depth_png16(np.array([[1.0, 2.0]], np.float32))
    np.testing.assert_allclose(decode_depth_png16(encoded.png, 10.0, 20.0), [[10.0, 20.0]])
    with pytest.raises(ValueError, match="16-bit grayscale"):
        decode_depth_png16(write_png(np.zeros((2, 2), np.uint8)))


def test_depth_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        encode_depth_png16(np.zeros((1, 4, 4), np.float32))


# ---- preview, confidence, sky -------------------------------------------------------------


def test_colormap_goes_from_dark_to_bright() -> None:
    assert COLORMAP.shape == (256, 3) and COLORMAP.dtype == np.uint8
    brightness = COLORMAP.astype(int).sum(axis=1)
    assert brightness[0] < 30 and brightness[-1] > 600
    assert (np.diff(brightness) >= -2).all()  # no dark bands along the ramp


def test_preview_near_is_warm_and_robust_to_outliers() -> None:
    depth = np.tile(np.linspace(1.0, 10.0, 100, dtype=np.float32), (50, 1))
    depth[0, 0] = 1e6  # one absurd outlier
    depth[0, 1] = np.nan
    image = open_png(encode_preview(depth))
    assert image.mode == "RGB" and image.size == (100, 50)
    rgb = np.asarray(image).astype(int)
    brightness = rgb.sum(axis=2)
    assert brightness[25, 2] > brightness[25, 50] > brightness[25, 97]  # near is brighter
    assert rgb[25, 2, 0] > rgb[25, 2, 2]  # and warm (red over blue)
    # The outlier does not compress the rest into a few colours.
    assert len(np.unique(brightness[25])) > 60
    np.testing.assert_array_equal(rgb[0, 1], COLORMAP[0])  # invalid: farthest colour


def test_preview_of_constant_or_invalid_maps() -> None:
    for depth in (np.ones((4, 4), np.float32), np.full((4, 4), np.nan, np.float32)):
        assert open_png(encode_preview(depth)).size == (4, 4)


def test_confidence_png() -> None:
    confidence = np.tile(np.linspace(1.0, 5.0, 101, dtype=np.float32), (3, 1))
    image = open_png(encode_confidence(confidence))
    assert image.mode == "L"
    values = np.asarray(image)[1]
    assert values[0] == 0 and values[-1] == 255 and (np.diff(values.astype(int)) >= 0).all()
    low, high = float(image.text["confidence_low"]), float(image.text["confidence_high"])
    assert low == pytest.approx(np.percentile(confidence, 2))
    assert high == pytest.approx(np.percentile(confidence, 98))


def test_sky_mask_threshold() -> None:
    sky = np.array([[0.0, 0.49, 0.5], [0.51, 1.0, np.nan]], dtype=np.float32)
    image = open_png(encode_sky_mask(sky))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), [[0, 0, 255], [255, 255, 0]])


def test_npy_is_exact() -> None:
    depth = RNG.random((7, 9)).astype(np.float32)
    depth[0, 0] = np.nan
    back = np.load(BytesIO(encode_npy(depth)), allow_pickle=False)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, depth)


# ---- point cloud --------------------------------------------------------------------------


def read_ply(data: bytes) -> np.ndarray:
    header, _, body = data.partition(b"end_header\n")
    lines = header.decode("ascii").splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    count = int(lines[2].split()[-1])
    assert lines[3:] == [
        "property float x",
        "property float y",
        "property float z",
        "property uchar red",
        "property uchar green",
        "property uchar blue",
    ]
    dtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")]
    vertices = np.frombuffer(body, dtype=dtype)
    assert len(vertices) == count
    return vertices


K = np.array([[40.0, 0.0, 15.5], [0.0, 42.0, 11.0], [0.0, 0.0, 1.0]])


def scene(height: int = 24, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    depth = (1.0 + RNG.random((height, width))).astype(np.float32)
    rgb = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return depth, rgb


def test_pointcloud_camera_frame() -> None:
    depth, rgb = scene()
    depth[3, 4], depth[5, 6], depth[7, 8] = np.nan, 0.0, -1.0
    vertices = read_ply(encode_pointcloud_ply(depth, K, rgb))
    assert len(vertices) == depth.size - 3  # invalid depths skipped
    # pixel (column 10, row 2) has its centre at (u, v) = (10.5, 2.5):
    # x = (u - cx) / fx * d, y = (v - cy) / fy * d, z = d
    d = depth[2, 10]
    index = 2 * 32 + 10 - 0  # row-major order, no skipped pixel before it
    point = vertices[index]
    np.testing.assert_allclose(
        [point["x"], point["y"], point["z"]],
        [(10.5 - 15.5) / 40 * d, (2.5 - 11) / 42 * d, d],
        rtol=1e-6,
    )
    assert (point["r"], point["g"], point["b"]) == tuple(rgb[2, 10])


def test_pointcloud_world_frame_matches_the_reference() -> None:
    torch = pytest.importorskip("torch")
    geometry = pytest.importorskip("depth_anything_3.utils.geometry")
    depth, rgb = scene()
    angle = 0.3
    rotation = np.array(
        [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    )
    w2c = np.concatenate([rotation, [[0.5], [-0.2], [1.5]]], axis=1)
    vertices = read_ply(encode_pointcloud_ply(depth, K, rgb, w2c))
    ours = np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1)
    c2w = np.linalg.inv(np.concatenate([w2c, [[0, 0, 0, 1]]]))
    # The reference back-projects integer pixel coordinates; ours use pixel centres (j + 0.5,
    # i + 0.5), which is the reference with the principal point moved by half a pixel.
    shifted = K - np.array([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])
    expected = geometry.unproject_depth(
        torch.from_numpy(depth.astype(np.float64))[None, None, ..., None],
        torch.from_numpy(shifted)[None, None],
        torch.from_numpy(c2w)[None, None],
    )[0, 0].reshape(-1, 3)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-5)
    colors = np.stack([vertices["r"], vertices["g"], vertices["b"]], axis=1)
    np.testing.assert_array_equal(colors, rgb.reshape(-1, 3))


def test_pointcloud_stride_and_max_points() -> None:
    depth, rgb = scene(30, 40)
    assert len(read_ply(encode_pointcloud_ply(depth, K, rgb, stride=2))) == 15 * 20
    assert len(read_ply(encode_pointcloud_ply(depth, K, rgb, max_points=300))) <= 300
    assert len(read_ply(encode_pointcloud_ply(depth, K, rgb, max_points=None))) == 1200
    empty = read_ply(encode_pointcloud_ply(np.zeros_like(depth), K, rgb))
    assert len(empty) == 0


def test_pointcloud_shape_mismatch() -> None:
    depth, rgb = scene()
    with pytest.raises(ValueError, match="rgb"):
        encode_pointcloud_ply(depth, K, rgb[:-1])
