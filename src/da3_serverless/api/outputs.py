"""The response's outputs: each view's depth PNG and requested extras, encoded, and which of
them fit inline as base64. Pure functions of the prediction; storage is the service's job."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from da3_serverless.api import encoding
from da3_serverless.api.images import DecodedImage
from da3_serverless.api.schema import RunRequest
from da3_serverless.inference.prediction import Prediction

# extra output name -> (file suffix, media type)
EXTRAS: dict[str, tuple[str, str]] = {
    "preview": (".png", "image/png"),
    "confidence": (".png", "image/png"),
    "sky_mask": (".png", "image/png"),
    "depth_npy": (".npy", "application/octet-stream"),
    "pointcloud": (".ply", "application/octet-stream"),
}
DEPTH_MEDIA = (".png", "image/png")


@dataclass
class Artifact:
    """One encoded output of one view, before it is placed inline, on the volume or a bucket."""

    view: int
    name: str  # "depth" or an EXTRAS key
    data: bytes
    suffix: str
    media_type: str
    fields: dict = field(default_factory=dict)  # response fields that go with it (depth range)


def view_skeleton(prediction: Prediction, index: int) -> dict:
    """A view's size and camera as response fields (3x3 intrinsics, 3x4 extrinsics lists)."""
    depth = prediction.depth[index]
    height, width = depth.shape

    def matrix(values: np.ndarray | None) -> list[list[float]] | None:
        return None if values is None else np.asarray(values[index], dtype=float).tolist()

    return {
        "width": int(width),
        "height": int(height),
        "intrinsics": matrix(prediction.intrinsics),
        "extrinsics": matrix(prediction.extrinsics),
    }


def encode_outputs(
    request: RunRequest, prediction: Prediction, images: list[DecodedImage]
) -> tuple[list[Artifact], list[str]]:
    """Every view's depth PNG and requested extras, encoded; warnings for extras this model
    cannot give."""
    artifacts, warnings = [], []
    for index in range(len(prediction)):
        png = encoding.encode_depth_png16(prediction.depth[index], units=prediction.units)
        fields = {
            "min_depth": png.min_depth,
            "max_depth": png.max_depth,
            "depth_encoding": encoding.DEPTH_ENCODING,
        }
        artifacts.append(Artifact(index, "depth", png.png, *DEPTH_MEDIA, fields=fields))
        for name in request.outputs:
            if name == "depth":
                continue
            data = _encode_extra(name, prediction, index, images[index])
            if data is None:
                warnings.append(f"{name} is not available from this model: {_MISSING[name]}")
            else:
                artifacts.append(Artifact(index, name, data, *EXTRAS[name]))
    return artifacts, warnings


_MISSING = {
    "confidence": "it predicts no confidence",
    "sky_mask": "it predicts no sky",
    "pointcloud": "it predicts no camera; send intrinsics to get a point cloud",
}


def _encode_extra(
    name: str, prediction: Prediction, index: int, image: DecodedImage
) -> bytes | None:
    depth = prediction.depth[index]
    if name == "preview":
        return encoding.encode_preview(depth)
    if name == "confidence":
        conf = prediction.confidence
        return None if conf is None else encoding.encode_confidence(conf[index])
    if name == "sky_mask":
        sky = prediction.sky
        return None if sky is None else encoding.encode_sky_mask(sky[index])
    if name == "depth_npy":
        return encoding.encode_npy(depth)
    if prediction.intrinsics is None:  # pointcloud
        return None
    extrinsics = None if prediction.extrinsics is None else prediction.extrinsics[index]
    rgb = np.asarray(image.image.convert("RGB"))
    return encoding.encode_pointcloud_ply(depth, prediction.intrinsics[index], rgb, extrinsics)


def fit_inline(
    artifacts: list[Artifact], budget: int, repeated_view: int | None = None
) -> set[int]:
    """ids of the artifacts that go inline as base64 within `budget` bytes: the depth maps
    first, then the extras in the order requested; whatever does not fit is stored.
    `repeated_view`'s artifacts count twice: a multi-view response repeats view 0 at the top."""
    inline = set()
    for artifact in sorted(artifacts, key=lambda a: a.name != "depth"):
        size = 4 * ((len(artifact.data) + 2) // 3)
        if artifact.view == repeated_view:
            size *= 2
        if size <= budget:
            inline.add(id(artifact))
            budget -= size
    return inline
