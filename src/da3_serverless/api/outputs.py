"""The response's outputs: which ones a model can give (one rule for all), each view's depth
PNG and requested extras, and the scene outputs of all views together, encoded. Pure functions
of the prediction; where each output goes is `api/placement.py`'s job."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from da3_serverless.api import encoding
from da3_serverless.api.images import DecodedImage
from da3_serverless.api.schema import SCENE_OUTPUTS, RunRequest
from da3_serverless.exports import colmap, exr, glb, maps, ply
from da3_serverless.exports.points import SceneOptions, fuse
from da3_serverless.inference.catalog import MODELS, ModelInfo
from da3_serverless.inference.prediction import Prediction

OCTET = "application/octet-stream"
# extra output name -> (file suffix, media type)
EXTRAS: dict[str, tuple[str, str]] = {
    "preview": (".png", "image/png"),
    "confidence": (".png", "image/png"),
    "sky_mask": (".png", "image/png"),
    "depth_npy": (".npy", OCTET),
    "pointcloud": (".ply", OCTET),
    "confidence_npy": (".npy", OCTET),
    "depth_exr": (".exr", "image/x-exr"),
    "depth_mm_png": (".png", "image/png"),
    "scene_ply": (".ply", OCTET),
    "scene_glb": (".glb", "model/gltf-binary"),
    "colmap": (".zip", "application/zip"),
}
DEPTH_MEDIA = (".png", "image/png")


@dataclass
class Artifact:
    """One encoded output, before it is placed inline, on the volume or a bucket: of one view,
    or of the whole scene (`view` None, top level of the response only)."""

    view: int | None
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


# ---- what a model can give: one rule, checked before any image is decoded -------------------


def unavailable_outputs(request: RunRequest, info: ModelInfo) -> list[str]:
    """Why each requested output is one that `info`'s model cannot give for this request (empty
    when all can be given). The rule, for every output: such a request is refused up front
    (`invalid_input`, before any decoding or inference) with these reasons."""
    reasons = {name: _unavailable(name, request, info) for name in request.outputs}
    return [f"{name}: {reason}" for name, reason in reasons.items() if reason]


def _models_with(capability: str) -> str:
    return ", ".join(m.short_name for m in MODELS if getattr(m, capability))


def _unavailable(name: str, request: RunRequest, info: ModelInfo) -> str | None:
    model = info.repo_id
    if name in ("confidence", "confidence_npy") and not info.confidence:
        return f"{model} predicts no confidence (models that do: {_models_with('confidence')})"
    if name == "sky_mask" and not info.sky:
        return f"{model} predicts no sky (models that do: {_models_with('sky')})"
    if name == "depth_mm_png" and not (
        request.output_metric and info.can_give_meters and request.extrinsics is None
    ):
        gives = "the poses' units" if request.extrinsics is not None else "relative depth"
        return (
            f"millimetres need meters, and {model} gives {gives} here: use a model that can "
            f"give meters ({_models_with('can_give_meters')}) with output_metric true and "
            "without extrinsics (with them the depth is in their units)"
        )
    if name in ("pointcloud", *SCENE_OUTPUTS) and not info.camera:
        if request.intrinsics is None:
            return f"{model} predicts no camera: send intrinsics"
        if name in SCENE_OUTPUTS and request.view_count > 1:
            return (
                f"{model} predicts no camera and takes no poses, so several views have no "
                f"common frame: send one view, or use a model with a camera "
                f"({_models_with('camera')})"
            )
    return None


# ---- per view ------------------------------------------------------------------------------


def encode_outputs(
    request: RunRequest, prediction: Prediction, images: list[DecodedImage]
) -> tuple[list[Artifact], list[str]]:
    """Every view's depth PNG, then the requested per-view extras in the order requested (each
    for every view); warnings (e.g. saturated millimetres)."""
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
        if name == "depth" or name in SCENE_OUTPUTS:
            continue
        for index in range(len(prediction)):
            artifacts.append(_encode_extra(name, prediction, index, images[index], warnings))
    return artifacts, warnings


def _encode_extra(
    name: str, prediction: Prediction, index: int, image: DecodedImage, warnings: list[str]
) -> Artifact:
    depth = prediction.depth[index]
    fields: dict = {}
    if name == "preview":
        data = encoding.encode_preview(depth)
    elif name == "confidence":
        data = encoding.encode_confidence(prediction.confidence[index])
    elif name == "sky_mask":
        data = encoding.encode_sky_mask(prediction.sky[index])
    elif name == "depth_npy":
        data = encoding.encode_npy(depth)
    elif name == "confidence_npy":
        data = maps.confidence_npy(prediction.confidence[index])
    elif name == "depth_exr":
        data = exr.depth_exr(depth)
    elif name == "depth_mm_png":
        millimetres = maps.depth_mm_png(depth)
        data, fields["depth_mm_saturated"] = millimetres.png, millimetres.saturated
        if millimetres.saturated:
            warnings.append(
                f"depth_mm_png of view {index}: {millimetres.saturated} pixel(s) past 65.535 m "
                "saturate at 65535 (use depth_npy or depth_exr for their depth)"
            )
    elif name == "pointcloud":
        extrinsics = None if prediction.extrinsics is None else prediction.extrinsics[index]
        rgb = np.asarray(image.image.convert("RGB"))
        data = encoding.encode_pointcloud_ply(depth, prediction.intrinsics[index], rgb, extrinsics)
    else:
        raise ValueError(f"no per-view encoder for output {name!r}")
    return Artifact(index, name, data, *EXTRAS[name], fields=fields)


# ---- the scene -----------------------------------------------------------------------------


def wants_scene(request: RunRequest) -> bool:
    """Whether the request asks for any scene output."""
    return any(name in SCENE_OUTPUTS for name in request.outputs)


def scene_options(request: RunRequest) -> SceneOptions:
    return SceneOptions(
        conf_percentile=request.conf_percentile,
        max_points=request.max_points,
        keep_sky=request.keep_sky,
        remove_edges=request.remove_edges,
        colmap_text=request.colmap_text,
    )


def encode_scene(
    request: RunRequest, prediction: Prediction, images: list[DecodedImage]
) -> tuple[list[Artifact], list[str]]:
    """The requested scene outputs (top level), in the order requested, from one fused cloud;
    each carries the response's `scene` summary. Nothing when none was requested."""
    names = [name for name in request.outputs if name in SCENE_OUTPUTS]
    if not names:
        return [], []
    pixels = [np.asarray(image.image.convert("RGB")) for image in images]
    options = scene_options(request)
    points = fuse(prediction, pixels, options)
    fields = {"scene": points.summary()}
    writers = {
        "scene_ply": lambda: ply.scene_ply(points, prediction.units),
        "scene_glb": lambda: glb.scene_glb(points, prediction),
        "colmap": lambda: colmap.colmap_zip(points, prediction, pixels, text=options.colmap_text),
    }
    artifacts = [Artifact(None, name, writers[name](), *EXTRAS[name], fields=fields)
                 for name in names]  # fmt: skip
    return artifacts, points.warnings
