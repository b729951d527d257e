"""A sequence's `gaussians_ply`: each chunk's 3D Gaussians of its OWNED frames (overlap frames
counted once, so chunk seams do not double a surface) brought into the first chunk's frame by
the chunk's Sim(3) (`inference.gaussians.moved_gaussians`: the model's one frame-change code,
from the chunk's predicted cameras to its aligned ones), filtered with the scene's filters as
the single request does (`exports.gaussians.select_gaussians` on the aligned frames: invalid,
sky, edges, confidence per chunk, then the voxel grid at `max_points`), then thinned evenly
per frame to the chunk's share as the scene's points are (`sequence/share.py`: up to
`max_points` over every frame however long the sequence turns out, what is held bounded by a
few times `max_points`, not by the sequence's length); `write` gives one PLY of them in the
request's layout (INRIA's or the compact one)."""

from __future__ import annotations

import numpy as np

from da3_serverless.api.outputs import scene_options
from da3_serverless.api.schema import RunRequest
from da3_serverless.exports.gaussians import gaussians_ply, select_gaussians
from da3_serverless.exports.points import FILTERS
from da3_serverless.inference.gaussians import moved_gaussians
from da3_serverless.inference.prediction import Gaussians, Prediction
from da3_serverless.sequence.assemble import AlignedChunk
from da3_serverless.sequence.share import EvenShare

_FIELDS = ("means", "scales", "rotations", "opacities", "colors", "sh_rest")


class GaussianCollector:
    """Collects the owned frames' kept Gaussians chunk by chunk; `write` gives the file."""

    def __init__(self, request: RunRequest):
        self.options = scene_options(request)
        self.layout = "compact" if request.gaussians_compact else "inria"
        self.kept = EvenShare(request.max_points)
        self.removed = dict.fromkeys(FILTERS, 0)
        self.removed["voxel"] = 0
        self.warnings: list[str] = []
        self._merged: Gaussians | None = None

    def add(self, aligned: AlignedChunk, prediction: Prediction) -> None:
        """The chunk's `prediction` (every frame of the chunk, with Gaussians, in the chunk's
        own frame) and its owned frames `aligned` (in the first chunk's frame)."""
        frames = aligned.outputs
        if not len(frames.depth):
            return
        owned = slice(aligned.chunk.overlap, None)
        moved = moved_gaussians(
            _part(prediction.gaussians, owned), prediction.extrinsics[owned],
            frames.extrinsics, 1.0 / aligned.transform.scale,
        )  # fmt: skip
        sky = None if prediction.sky is None else prediction.sky[owned]
        chunk = Prediction(
            frames.depth, frames.confidence, sky, frames.intrinsics, frames.extrinsics,
            is_metric=False, units="", gaussians=moved,
        )  # fmt: skip
        selection = select_gaussians(chunk, self.options)
        for name, count in selection.removed.items():
            self.removed[name] += count
        self.warnings += selection.warnings
        keep = selection.keep.reshape(-1)
        kept = _part(moved, keep, flat=True)
        fields = {name: getattr(kept, name) for name in _FIELDS}
        if self.layout == "compact":
            fields.pop("sh_rest")
        columns = {name: values for name, values in fields.items() if values is not None}
        frame = aligned.frames.start + np.flatnonzero(keep) // (keep.size // len(frames.depth))
        self.kept.add(columns, frame, len(frames.depth))

    def gaussians(self) -> Gaussians:
        """Every chunk's kept Gaussians, at most `max_points` (merged once)."""
        if self._merged is None:
            self._merged = self._merge()
        return self._merged

    def _merge(self) -> Gaussians:
        kept = self.kept.final()
        if kept is None:  # no frame: no Gaussian
            kept = {name: np.zeros((0, 4 if name == "rotations" else 3), np.float32)
                    for name in ("means", "scales", "rotations", "colors")}  # fmt: skip
            kept["opacities"] = np.zeros(0, np.float32)
        return Gaussians(**kept)

    def write(self, units: str) -> bytes:
        comments = [
            "da3-serverless 3D Gaussians: world frame of the sequence's first frame "
            "(OpenCV axes: x right, y down, z forward)",
            f"units {units}",
        ]
        return gaussians_ply(self.gaussians(), comments=comments, layout=self.layout)

    def summary(self) -> dict:
        """The response's `gaussians` object (the scene summary's fields, in Gaussians; the
        confidence threshold and voxel size are per chunk, so none is reported)."""
        points = len(self.gaussians())  # thinned to max_points first, counted in `thinned`
        return {
            "points": points,
            "removed": {**self.removed, "voxel": self.removed["voxel"] + self.kept.thinned},
            "confidence_threshold": None,
            "voxel_size": None,
        }


def _part(gaussians: Gaussians, index, flat: bool = False) -> Gaussians:
    """Gaussians indexed along their first dimension (views), or with `flat` along their
    flattened leading (view, row, column) dimensions by a boolean mask."""

    def pick(name: str) -> np.ndarray | None:
        values = getattr(gaussians, name)
        if values is None:
            return None
        if flat:
            tail = {"opacities": 0, "sh_rest": 2}.get(name, 1)
            shape = values.shape[values.ndim - tail :] if tail else ()
            return np.asarray(values).reshape(-1, *shape)[index]
        return np.asarray(values[index])

    return Gaussians(**{name: pick(name) for name in _FIELDS})
