"""The fused scene as a binary little-endian PLY: x, y, z (float32, world coordinates), red,
green, blue (uint8) and confidence (float32, NaN for models without confidence) per vertex."""

from __future__ import annotations

import numpy as np

from da3_serverless.exports.points import ScenePoints

VERTEX = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
     ("confidence", "<f4")]
)  # fmt: skip


def scene_ply(points: ScenePoints, units: str) -> bytes:
    """The PLY file of `points`; its comments name the frame and the `units` of the depth."""
    vertices = np.empty(len(points), dtype=VERTEX)
    vertices["x"], vertices["y"], vertices["z"] = points.xyz.T
    vertices["red"], vertices["green"], vertices["blue"] = points.rgb.T
    vertices["confidence"] = points.confidence
    header = (
        "ply\n"
        "format binary_little_endian 1.0\n"
        "comment da3-serverless scene: world frame of the response's extrinsics "
        "(OpenCV axes: x right, y down, z forward)\n"
        f"comment units {units}\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "property float confidence\n"
        "end_header\n"
    )
    return header.encode("ascii") + vertices.tobytes()
