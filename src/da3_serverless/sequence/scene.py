"""A sequence's scene files (`scene_ply`, `scene_glb`, `colmap`): each chunk's OWNED frames
(overlap frames counted once, so chunk seams do not double a surface), already in the first
chunk's frame, fused with the scene filters of `exports/points.py` as the chunk comes (as a
single request of its frames: the voxel grid at `max_points`), then thinned evenly per frame
to the chunk's share (`sequence/share.py`: up to `max_points` over every frame however long
the sequence turns out, what is held bounded by a few times `max_points`, not by the
sequence's length). The files
are the single-request exports (`exports/ply.py`, `exports/glb.py`, `exports/colmap.py`) of
those points and of every frame's camera (`FrameStore.cameras`); COLMAP's images are the
frames' RGB, kept on disk by the `FrameStore` (`keep_images`) and written into a zip on disk
one at a time. A point's COLMAP track is its own pixel only: chunks are fused apart, so no
merged pixels of other frames are tracked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from da3_serverless.api.outputs import scene_options
from da3_serverless.api.schema import RunRequest
from da3_serverless.exports.colmap import write_colmap_zip
from da3_serverless.exports.glb import scene_glb
from da3_serverless.exports.ply import scene_ply
from da3_serverless.exports.points import FILTERS, ScenePoints, fuse
from da3_serverless.inference.prediction import Prediction
from da3_serverless.sequence.assemble import AlignedChunk
from da3_serverless.sequence.outputs import FrameStore
from da3_serverless.sequence.share import EvenShare

_COLUMNS = ("xyz", "rgb", "confidence", "view", "row", "col")
_EMPTY = (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), np.zeros(0, np.float32),
          *[np.zeros(0, np.int32)] * 3)  # fmt: skip


class SceneCollector:
    """Collects the owned frames' points chunk by chunk; `write` gives each scene file."""

    def __init__(self, request: RunRequest):
        self.options = scene_options(request)
        self.kept = EvenShare(request.max_points)
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
        points = fuse(owned, [np.asarray(image) for image in images], self.options)
        points.view = points.view + aligned.frames.start
        for name, count in points.removed.items():
            self.removed[name] += count
        columns = {name: getattr(points, name) for name in _COLUMNS}
        self.kept.add(columns, points.view, len(frames.depth))

    def points(self) -> ScenePoints:
        """Every chunk's points, at most `max_points` (computed once)."""
        if self._points is None:
            self._points = self._merge()
        return self._points

    def _merge(self) -> ScenePoints:
        kept = self.kept.final()
        if kept is None:  # no frame: no point
            kept = dict(zip(_COLUMNS, _EMPTY, strict=True))
        removed = {**self.removed, "voxel": self.removed["voxel"] + self.kept.thinned}
        return ScenePoints(**kept, removed=removed)

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
