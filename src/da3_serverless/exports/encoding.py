"""Turning prediction arrays into files (the formats every export and the API share): 16-bit
depth PNG, colour preview, confidence and sky PNGs, float32 .npy and a binary PLY point cloud.

PNGs are written by `write_png` below rather than by Pillow: Pillow tries every PNG filter on
every row and compresses with zlib, which takes 1.5-2 s for a 4096 x 4096 16-bit map on a small
CPU. One fixed "Up" filter (computed with numpy) and ISA-L's deflate (`isal`, zlib-compatible
output, ~4x faster than zlib level 1 and smaller here) bring it to a few tenths of a second.
Reading uses Pillow (`decode_depth_png16`).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from isal import isal_zlib
from PIL import Image

DEPTH_ENCODING = "png16-linear"
MAX_PLY_POINTS = 2_000_000
# Percentiles that set the preview's and confidence map's range, so a few outliers don't wash
# out the rest; computed on at most ~1M samples to keep them cheap on 4096 x 4096 maps.
LOW_PERCENTILE, HIGH_PERCENTILE = 2.0, 98.0
SKY_THRESHOLD = 0.5


# ---- PNG writer -------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_png(pixels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """A PNG from `pixels`: (H,W) uint8 or uint16 (either byte order) grayscale, or (H,W,3) uint8
    RGB; `text` goes into tEXt chunks (latin-1 keys of 1-79 characters) before the pixel data."""
    unsigned = pixels.dtype.kind == "u"
    if pixels.ndim == 2 and unsigned and pixels.dtype.itemsize in (1, 2):
        color_type, bit_depth = 0, pixels.dtype.itemsize * 8
    elif pixels.ndim == 3 and pixels.shape[2] == 3 and unsigned and pixels.dtype.itemsize == 1:
        color_type, bit_depth = 2, 8
    else:
        raise ValueError(f"cannot write {pixels.dtype} pixels of shape {pixels.shape} as PNG")
    height, width = pixels.shape[:2]
    # PNG stores 16-bit samples big-endian.
    rows = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder(">"))
    rows = rows.view(np.uint8).reshape(height, -1)
    # Filter type 2 ("Up"): each byte minus the byte above it, modulo 256.
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    data = isal_zlib.compress(filtered, 1)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    for key, value in (text or {}).items():
        chunks.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
    chunks += [_chunk(b"IDAT", data), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


# ---- depth ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedDepth:
    """A depth map as a 16-bit PNG: depth = min_depth + v * (max_depth - min_depth) / 65535."""

    png: bytes
    min_depth: float
    max_depth: float


def encode_depth_png16(depth: np.ndarray, units: str = "m") -> EncodedDepth:
    """Encode a (H,W) depth map as a 16-bit grayscale PNG, linearly between its finite min and
    max: v = round((d - min) / (max - min) * 65535), so decoding is off by at most half a step,
    (max - min) / 131070. A constant map encodes as all zeros with min = max. NaN and -inf become
    0 (read back as min_depth), +inf becomes 65535 (max_depth); a map with no finite value gives
    min = max = 0. The PNG's tEXt chunks repeat min_depth, max_depth, units and depth_encoding.
    """
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    depth = np.asarray(depth, dtype=np.float32)
    finite = np.isfinite(depth)
    values = depth if bool(finite.all()) else depth[finite]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    levels = np.empty(depth.shape, np.uint16)
    rows = max(1, _LEVEL_CHUNK // max(1, depth.shape[1]))
    for top in range(0, depth.shape[0], rows):
        levels[top : top + rows] = _levels(depth[top : top + rows], lo, hi)
    text = {
        "min_depth": repr(lo),
        "max_depth": repr(hi),
        "units": units,
        "depth_encoding": DEPTH_ENCODING,
    }
    return EncodedDepth(write_png(levels, text), lo, hi)


# Pixels quantised at a time: a float64 buffer of 8 MB, however large the map.
_LEVEL_CHUNK = 1 << 20


def _levels(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """round((d - lo) / (hi - lo) * 65535) as uint16, in float64: float32 arithmetic misses the
    half-step bound by up to a percent of a step, float64 by under 1e-10 of one. NaN and -inf
    give 0, +inf 65535."""
    q = depth.astype(np.float64)
    if hi > lo:
        q -= lo
        q /= hi - lo
        q *= 65535.0
    else:
        q[np.isfinite(q)] = 0.0
    np.nan_to_num(q, copy=False, nan=0.0, posinf=65535.0, neginf=0.0)
    np.clip(q, 0.0, 65535.0, out=q)
    np.rint(q, out=q)
    return q.astype(np.uint16)


def decode_depth_png16(
    png: bytes, min_depth: float | None = None, max_depth: float | None = None
) -> np.ndarray:
    """Depth (H,W) float32 from a PNG written by `encode_depth_png16`. `min_depth`/`max_depth`
    default to the values in the PNG's text chunks (pass the response's when they were lost)."""
    with Image.open(BytesIO(png)) as image:
        if image.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"expected a 16-bit grayscale PNG, got mode {image.mode}")
        text = getattr(image, "text", {})
        v = np.asarray(image).astype(np.float64)
    try:
        lo = float(text["min_depth"]) if min_depth is None else float(min_depth)
        hi = float(text["max_depth"]) if max_depth is None else float(max_depth)
    except KeyError as missing:
        raise ValueError(
            f"the PNG has no {missing} text chunk: pass min_depth and max_depth from the response"
        ) from None
    return (lo + v * ((hi - lo) / 65535.0)).astype(np.float32)


# ---- previews and masks -----------------------------------------------------------------------

# A perceptually ordered dark-purple -> red -> orange -> pale-yellow ramp (inferno-like),
# interpolated from a few hand-picked anchors into a 256-entry lookup table.
_ANCHORS = np.array(
    [
        (0, 0, 4),
        (22, 11, 57),
        (66, 10, 104),
        (106, 23, 110),
        (147, 38, 103),
        (188, 55, 84),
        (221, 81, 58),
        (243, 120, 25),
        (252, 165, 10),
        (246, 215, 70),
        (252, 255, 164),
    ],
    dtype=np.float64,
)
COLORMAP = (
    np.stack(
        [
            np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
            for c in range(3)
        ],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    """(2nd, 98th) percentile of the finite values, on a strided sample of at most ~1M."""
    flat = values.reshape(-1)
    flat = flat[:: max(1, flat.size // 1_000_000)]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(flat, [LOW_PERCENTILE, HIGH_PERCENTILE])
    return float(lo), float(hi)


def _to_uint8(values: np.ndarray, zero: float, full: float) -> np.ndarray:
    """Values mapped linearly so `zero` -> 0 and `full` -> 255 (either may be the larger),
    rounded and clipped; non-finite values and a map with zero == full give 0."""
    t = np.subtract(values, np.float32(zero), dtype=np.float32)
    if full != zero:
        t /= np.float32(full - zero)  # dividing first: 255 / tiny ranges overflows float32
        t *= np.float32(255.0)
    else:
        t.fill(0.0)
    np.clip(t, 0.0, 255.0, out=t)
    np.rint(t, out=t)
    finite = np.isfinite(values)
    if not finite.all():
        t[~finite] = 0.0
    return t.astype(np.uint8)


def encode_preview(depth: np.ndarray) -> bytes:
    """A colour PNG of a (H,W) depth map for people: near is bright yellow, far dark purple.
    The colours span the map's 2nd..98th depth percentiles (outliers saturate); invalid
    (non-finite) pixels are drawn as the farthest colour."""
    lo, hi = _robust_range(depth)
    return write_png(COLORMAP[_to_uint8(depth, hi, lo)])


def encode_confidence(confidence: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a (H,W) confidence map, relative to the map itself: its 2nd
    percentile -> 0, its 98th -> 255, linear and clipped in between (non-finite -> 0). The two
    values are in the tEXt chunks `confidence_low` and `confidence_high`."""
    lo, hi = _robust_range(confidence)
    text = {"confidence_low": repr(lo), "confidence_high": repr(hi)}
    return write_png(_to_uint8(confidence, lo, hi), text)


def encode_sky_mask(sky: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a (H,W) sky probability map: 255 where sky >= 0.5, else 0."""
    mask = (sky >= SKY_THRESHOLD).view(np.uint8)  # 0 or 1, without a wider temporary
    return write_png(mask * np.uint8(255))


def encode_npy(depth: np.ndarray) -> bytes:
    """The depth map as an exact float32 `.npy` file (`np.load(BytesIO(data))` reads it)."""
    out = BytesIO()
    np.save(out, np.asarray(depth, dtype=np.float32), allow_pickle=False)
    return out.getvalue()


# ---- point cloud ------------------------------------------------------------------------------


def encode_pointcloud_ply(
    depth: np.ndarray,
    intrinsics: np.ndarray,
    rgb: np.ndarray,
    extrinsics: np.ndarray | None = None,
    *,
    stride: int = 1,
    max_points: int | None = MAX_PLY_POINTS,
) -> bytes:
    """A binary little-endian PLY of coloured 3D points back-projected from a depth map.

    depth (H,W) with z-depth, intrinsics (3,3) in pixels, rgb (H,W,3) uint8. The pixel in column j,
    row i has its centre at (u, v) = (j + 0.5, i + 0.5) (the convention of DA3's principal point
    and of COLMAP) and at depth d gives x_cam = d * K^-1 [u, v, 1]. With extrinsics (3,4)
    world-to-camera [R|t], points are written in world coordinates x_world = R^T (x_cam - t),
    else in camera coordinates. Pixels with non-finite or non-positive depth are skipped. Every
    `stride`-th row and column is used; `max_points` raises the stride until the grid holds at
    most that many pixels. Vertex properties: float x, y, z; uchar red, green, blue.
    """
    if depth.ndim != 2 or rgb.shape != (*depth.shape, 3):
        raise ValueError(f"need depth (H,W) and rgb (H,W,3), got {depth.shape} and {rgb.shape}")
    height, width = depth.shape
    if max_points is not None:
        stride = max(stride, math.ceil(math.sqrt(height * width / max(max_points, 1))))
    d = np.asarray(depth[::stride, ::stride], dtype=np.float32)
    colors = np.asarray(rgb[::stride, ::stride], dtype=np.uint8)
    v, u = np.mgrid[0:height:stride, 0:width:stride].astype(np.float32) + np.float32(0.5)
    valid = np.isfinite(d) & (d > 0)
    d, u, v, colors = d[valid], u[valid], v[valid], colors[valid]
    # One affine map from d * [u, v, 1] to the output frame: x = M p + offset.
    matrix = np.linalg.inv(np.asarray(intrinsics, dtype=np.float64))
    offset = np.zeros(3)
    if extrinsics is not None:
        e = np.asarray(extrinsics, dtype=np.float64)
        rotation, translation = e[:3, :3], e[:3, 3]
        matrix, offset = rotation.T @ matrix, -(rotation.T @ translation)
    vertices = np.empty(
        len(d),
        dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")],
    )
    # Written out per axis: numpy's (N,3) @ (3,3) is an order of magnitude slower here.
    pu, pv = u * d, v * d
    for axis, name in enumerate("xyz"):
        m = matrix[axis].astype(np.float32)
        vertices[name] = m[0] * pu + m[1] * pv + m[2] * d + np.float32(offset[axis])
    vertices["r"], vertices["g"], vertices["b"] = colors.T
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "end_header\n"
    )
    return header.encode("ascii") + vertices.tobytes()
