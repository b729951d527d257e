"""Per-view float maps as files: the confidence as exact float32 `.npy`, and metric depth as a
16-bit PNG of millimetres (the RealSense / ScanNet convention: 0 = invalid)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from da3_serverless.exports.encoding import encode_npy, write_png

MAX_MM = 65535  # the largest uint16: 65.535 m


@dataclass(frozen=True)
class DepthMillimetres:
    """A 16-bit millimetre PNG and how many of its pixels saturated at 65535 (past 65.535 m)."""

    png: bytes
    saturated: int


def confidence_npy(confidence: np.ndarray) -> bytes:
    """A (H, W) confidence map as an exact float32 `.npy`."""
    return encode_npy(confidence)


def depth_mm_png(depth_m: np.ndarray) -> DepthMillimetres:
    """A (H, W) depth map in meters as a uint16 PNG of millimetres: round(1000 d), at least 1
    for any positive depth, 65535 past 65.535 m (counted in `saturated`), 0 for invalid
    (non-finite or non-positive) depth. The PNG's text chunks say `units` mm and `invalid` 0."""
    depth = np.asarray(depth_m, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    millimetres = np.zeros(depth.shape, dtype=np.float64)
    np.multiply(depth, 1000.0, out=millimetres, where=valid)
    np.rint(millimetres, out=millimetres)
    saturated = int(np.count_nonzero(millimetres > MAX_MM))
    np.clip(millimetres, 0, MAX_MM, out=millimetres)
    millimetres[valid & (millimetres < 1)] = 1
    text = {"units": "mm", "invalid": "0", "depth_encoding": "uint16-millimetres"}
    return DepthMillimetres(write_png(millimetres.astype(np.uint16), text), saturated)
