"""A sequence's scene cloud (`scene_ply`): each chunk's OWNED frames (overlap frames counted
once, so chunk seams do not double a surface), already in the first chunk's frame, fused with
the scene filters of `exports/points.py` as the chunk comes, each chunk thinned to its share
of `max_points`; only the kept points stay in memory (bounded by `max_points`, not by the
sequence's length)."""

from __future__ import annotations

import numpy as np

from da3_serverless.api.schema import RunRequest
from da3_serverless.exports.ply import scene_ply
from da3_serverless.exports.points import FILTERS, SceneOptions, ScenePoints, fuse
from da3_serverless.inference.prediction import Prediction
from da3_serverless.sequence.assemble import AlignedChunk


class SceneCollector:
    """Collects the owned frames' points chunk by chunk; `ply` writes them."""

    def __init__(self, request: RunRequest, planned_frames: int):
        self.max_points = request.max_points
        self.planned = max(planned_frames, 1)
        self.options = SceneOptions(
            request.conf_percentile, request.max_points, request.keep_sky, request.remove_edges
        )
        self.parts: list[ScenePoints] = []
        self.removed = dict.fromkeys(FILTERS, 0)

    def add(self, aligned: AlignedChunk, sky: np.ndarray | None, images: list) -> None:
        """The chunk's owned frames (`images`: their upright RGB inputs)."""
        frames = aligned.outputs
        if not len(frames.depth):
            return
        owned = Prediction(
            frames.depth, frames.confidence, sky, frames.intrinsics, frames.extrinsics,
            is_metric=False, units="",
        )  # fmt: skip
        share = max(1, round(self.max_points * len(frames.depth) / self.planned))
        options = SceneOptions(**{**vars(self.options), "max_points": share})
        points = fuse(owned, [np.asarray(image) for image in images], options)
        points.view = points.view + aligned.frames.start
        for name, count in points.removed.items():
            self.removed[name] += count
        self.parts.append(points)

    def points(self) -> ScenePoints:
        columns = ("xyz", "rgb", "confidence", "view", "row", "col")
        merged = {
            name: np.concatenate([getattr(part, name) for part in self.parts]) for name in columns
        }
        extra = len(merged["xyz"]) - self.max_points
        if extra > 0:  # more frames than planned gave points: thin evenly
            keep = np.linspace(0, len(merged["xyz"]) - 1, self.max_points).round().astype(int)
            merged = {name: values[keep] for name, values in merged.items()}
            self.removed["voxel"] += extra
        return ScenePoints(**merged, removed=dict(self.removed))

    def ply(self, units: str) -> tuple[bytes, dict]:
        """The PLY and the response's `scene` summary."""
        points = self.points()
        return scene_ply(points, units), points.summary()
