"""Putting chunks together: each chunk's prediction (in its own frame and scale) is brought
into the first chunk's frame by a Sim(3) fitted on the frames it shares with the chunk before
(`align.robust_sim3` on their depth points), and its owned frames come out in that one frame.

Only the previous chunk's overlap frames stay in memory; the caller writes each chunk's
`AlignedChunk` away before adding the next. The transform of chunk k is the composition of the
relative fits 1..k, which leaves room for a pose graph (loop closure) over them later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from da3_serverless.sequence.align import Sim3, robust_sim3
from da3_serverless.sequence.plan import Chunk

# Overlap points used per fit (pixels are subsampled on a regular grid down to about this).
FIT_POINTS = 60_000


@dataclass
class ChunkFrames:
    """A chunk's per-frame outputs in one frame of reference: depth and confidence (n, H, W),
    intrinsics (n, 3, 3), world-to-camera extrinsics (n, 3, 4). Any object with these
    attributes (a `Prediction`) will do as input."""

    depth: np.ndarray
    confidence: np.ndarray | None
    intrinsics: np.ndarray
    extrinsics: np.ndarray


@dataclass
class AlignedChunk:
    """A chunk's owned frames (global indices `frames`) in the first chunk's frame, with its
    transform (chunk frame -> first chunk's frame) and the fit's residual and inlier share
    (0 and 1 for the first chunk)."""

    chunk: Chunk
    frames: range
    outputs: ChunkFrames
    transform: Sim3
    residual: float
    inliers: float


class Assembler:
    """Add chunks in plan order (each after the first overlapping the one before by
    `overlap` frames); each `add` returns the chunk's owned frames aligned."""

    def __init__(self, overlap: int, fit_points: int = FIT_POINTS):
        self.overlap = overlap
        self.fit_points = fit_points
        self._transform = Sim3.identity()
        self._tail: ChunkFrames | None = None  # the previous chunk's last frames, its own frame

    def add(self, chunk: Chunk, prediction: ChunkFrames) -> AlignedChunk:
        if len(prediction.depth) != len(chunk):
            raise ValueError(
                f"chunk {chunk.index} has {len(chunk)} frames, got {len(prediction.depth)}"
            )
        residual, inliers = 0.0, 1.0
        if chunk.overlap:
            head = _frames(prediction, slice(0, chunk.overlap))
            fit = robust_sim3(*self._correspondences(head, self._tail))
            self._transform = self._transform.compose(fit.transform)
            residual, inliers = fit.residual, fit.inliers
        self._tail = _frames(prediction, slice(max(len(chunk) - self.overlap, 0), len(chunk)))
        owned = _frames(prediction, slice(chunk.overlap, len(chunk)))
        return AlignedChunk(
            chunk, chunk.owned, _moved(owned, self._transform), self._transform, residual, inliers
        )

    def _correspondences(self, head: ChunkFrames, tail: ChunkFrames | None):
        """The fit's arguments: the same pixels of the shared frames as 3D points in this
        chunk's frame (source) and the previous chunk's (target), their confidence, and
        their depths in the previous chunk and in this one."""
        if tail is None or len(tail.depth) != len(head.depth):
            raise ValueError("chunks must be added in plan order")
        frames, height, width = head.depth.shape
        stride = max(1, math.ceil(math.sqrt(frames * height * width / self.fit_points)))
        source, source_depth = world_points(head, stride)
        target, target_depth = world_points(tail, stride)
        confidence = _sampled(head.confidence, stride) * _sampled(tail.confidence, stride)
        if head.confidence is None and tail.confidence is None:
            confidence = np.ones(len(source))
        return source, target, confidence, target_depth, source_depth


def world_points(frames: ChunkFrames, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Every `stride`-th pixel (rows and columns, centres at +0.5) of each frame lifted to
    the frames' world: points (M, 3) and their depths (M,)."""
    count, height, width = frames.depth.shape
    rows = np.arange(0, height, stride) + 0.5
    cols = np.arange(0, width, stride) + 0.5
    grid_x, grid_y = np.meshgrid(cols, rows)
    pixels = np.stack([grid_x, grid_y, np.ones_like(grid_x)], axis=-1).reshape(-1, 3)
    points, depths = [], []
    for index in range(count):
        depth = frames.depth[index, ::stride, ::stride].astype(np.float64).reshape(-1)
        rays = pixels @ np.linalg.inv(frames.intrinsics[index].astype(np.float64)).T
        camera = rays * depth[:, None]
        rotation = frames.extrinsics[index, :, :3].astype(np.float64)
        translation = frames.extrinsics[index, :, 3].astype(np.float64)
        points.append((camera - translation) @ rotation)
        depths.append(depth)
    return np.concatenate(points), np.concatenate(depths)


def _sampled(confidence: np.ndarray | None, stride: int) -> np.ndarray | float:
    if confidence is None:
        return 1.0
    return confidence[:, ::stride, ::stride].astype(np.float64).reshape(-1)


def _frames(prediction: ChunkFrames, part: slice) -> ChunkFrames:
    confidence = prediction.confidence
    return ChunkFrames(
        np.asarray(prediction.depth[part]),
        None if confidence is None else np.asarray(confidence[part]),
        np.asarray(prediction.intrinsics[part]),
        np.asarray(prediction.extrinsics[part]),
    )


def _moved(frames: ChunkFrames, transform: Sim3) -> ChunkFrames:
    """Frames in the transform's target frame: depth scaled, cameras moved."""
    return ChunkFrames(
        (frames.depth * transform.scale).astype(np.float32),
        frames.confidence,
        frames.intrinsics.astype(np.float32),
        transform.move_extrinsics(frames.extrinsics).astype(np.float32),
    )
