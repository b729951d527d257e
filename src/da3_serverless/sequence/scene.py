"""A sequence's scene files (`scene_ply`, `scene_glb`, `colmap`): each chunk's OWNED frames
(overlap frames counted once, so chunk seams do not double a surface), already in the first
chunk's frame, fused with the scene filters of `exports/points.py` as the chunk comes, each
chunk thinned to its share of `max_points`; only the kept points stay in memory (bounded by
`max_points`, not by the sequence's length). The files are the single-request exports
(`exports/ply.py`, `exports/glb.py`, `exports/colmap.py`) of those points and of every frame's
camera (`FrameStore.cameras`); COLMAP's images are the frames' RGB, kept on disk by the
`FrameStore` (`keep_images`) and written into a zip on disk one at a time. A point's COLMAP
track is its own pixel only: chunks are fused apart, so no merged pixels of other frames are
tracked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from da3_serverless.api.schema import RunRequest
from da3_serverless.exports.colmap import write_colmap_zip
from da3_serverless.exports.glb import scene_glb
from da3_serverless.exports.ply import scene_ply
from da3_serverless.exports.points import FILTERS, SceneOptions, ScenePoints, fuse
from da3_serverless.inference.prediction import Prediction
from da3_serverless.sequence.assemble import AlignedChunk
from da3_serverless.sequence.outputs import FrameStore


class SceneCollector:
    """Collects the owned frames' points chunk by chunk; `write` gives each scene file."""

    def __init__(self, request: RunRequest, planned_frames: int):
        self.max_points = request.max_points
        self.planned = max(planned_frames, 1)
        self.options = SceneOptions(
            request.conf_percentile, request.max_points, request.keep_sky, request.remove_edges,
            request.colmap_text, request.colmap_images,
        )  # fmt: skip
        self.parts: list[ScenePoints] = []
        self.removed = dict.fromkeys(FILTERS, 0)
        self._points: ScenePoints | None = None

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
        """Every chunk's points, at most `max_points` (computed once)."""
        if self._points is None:
            self._points = self._merge()
        return self._points

    def _merge(self) -> ScenePoints:
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

    def write(self, name: str, frames: FrameStore, units: str) -> bytes | Path:
        """The file `name` ("scene_ply", "scene_glb" or "colmap") of the points and every
        frame of `frames`. The PLY and GLB are bytes: their size is bounded by `max_points`
        (and a few numbers per camera). "colmap" carries every frame's image, so it grows with
        the sequence: it is written into the store's folder, one image at a time, and its path
        returned (it needs the store's images: `keep_images`)."""
        points = self.points()
        if name == "scene_ply":
            return scene_ply(points, units)
        cameras = frames.cameras(units)
        if name == "scene_glb":
            return scene_glb(points, cameras)
        target = Path(frames.folder) / "colmap.zip"
        with open(target, "wb") as out:
            write_colmap_zip(
                out, points, cameras, FrameImages(frames), self.options.colmap_text,
                self.options.colmap_images,
            )  # fmt: skip
        return target

    def summary(self) -> dict:
        """The response's `scene` object."""
        return self.points().summary()


class FrameImages(Sequence):
    """The RGB of every frame of a store, read from disk one at a time."""

    def __init__(self, frames: FrameStore):
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index):
        if not 0 <= index < len(self.frames):
            raise IndexError(index)
        return self.frames.image(index)
