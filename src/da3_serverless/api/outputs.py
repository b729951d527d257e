"""The response's outputs: which ones a model can give (one rule for all), each view's depth
PNG and requested extras, and the scene outputs of all views together, encoded. Pure functions
of the prediction; where each output goes is `api/placement.py`'s job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from da3_serverless.api.images import DecodedImage
from da3_serverless.api.schema import GAUSSIAN_OUTPUT, SCENE_OUTPUTS, TOP_LEVEL_OUTPUTS, RunRequest
from da3_serverless.exports import colmap, encoding, exr, glb, maps, ply
from da3_serverless.exports.gaussians import gaussians_ply, select_gaussians
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
    "gaussians_ply": (".ply", OCTET),
}
DEPTH_MEDIA = (".png", "image/png")


@dataclass
class Artifact:
    """One encoded output, before it is placed inline, on the volume or a bucket: of one view,
    or of the whole scene (`view` None, top level of the response only). `data` is the bytes,
    or a file on disk (`Path`) for outputs that grow with a sequence's length: placement sizes
    the file by its length, reads it only to put it inline and otherwise moves it to the volume
    (the file is the artifact's own: placement may move it away)."""

    view: int | None
    name: str  # "depth" or an EXTRAS key
    data: bytes | Path
    suffix: str
    media_type: str
    fields: dict = field(default_factory=dict)  # response fields that go with it (depth range)

    @property
    def size(self) -> int:
        """The encoded output's length in bytes (of the file: its size on disk)."""
        return len(self.data) if isinstance(self.data, bytes) else self.data.stat().st_size

    def read(self) -> bytes:
        """The encoded output in memory (a file's whole content: for inline outputs only)."""
        return self.data if isinstance(self.data, bytes) else self.data.read_bytes()


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
    if name == GAUSSIAN_OUTPUT and not info.gaussians:
        # Said of the checkpoint, not the release: a snapshot folder may hold the head or not.
        return (
            f"the checkpoint of {model} in use has no 3D-Gaussian head (gs_head weights): "
            f"use a model whose checkpoint has one ({_models_with('gaussians')})"
        )
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
        if name == "depth" or name in TOP_LEVEL_OUTPUTS:
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
    """Whether the request asks for any scene output (top level: points' files or Gaussians)."""
    return any(name in TOP_LEVEL_OUTPUTS for name in request.outputs)


def wants_points(request: RunRequest) -> bool:
    """Whether the request asks for a file of the fused points (scene_ply, scene_glb, colmap)."""
    return any(name in SCENE_OUTPUTS for name in request.outputs)


def wants_gaussians(request: RunRequest) -> bool:
    """Whether the request asks for the 3D Gaussians (the network then runs their branch)."""
    return GAUSSIAN_OUTPUT in request.outputs


def scene_options(request: RunRequest) -> SceneOptions:
    return SceneOptions(
        conf_percentile=request.conf_percentile,
        max_points=request.max_points,
        keep_sky=request.keep_sky,
        remove_edges=request.remove_edges,
        colmap_text=request.colmap_text,
        colmap_images=request.colmap_images,
        gaussians_compact=request.gaussians_compact,
    )


def encode_scene(
    request: RunRequest, prediction: Prediction, images: list[DecodedImage]
) -> tuple[list[Artifact], list[str]]:
    """The requested scene outputs (top level), in the order requested: the points' files from
    one fused cloud, each carrying the response's `scene` summary, and the Gaussians' PLY with
    its `gaussians` summary. Nothing when none was requested."""
    options = scene_options(request)
    artifacts, warnings = [], []
    if wants_points(request):
        artifacts, warnings = _encode_points(request, prediction, images, options)
    if wants_gaussians(request):
        selection = select_gaussians(prediction, options)
        comments = [
            "da3-serverless 3D Gaussians: world frame of the response's extrinsics "
            "(OpenCV axes: x right, y down, z forward)",
            f"units {prediction.units}",
        ]
        layout = "compact" if options.gaussians_compact else "inria"
        data = gaussians_ply(
            prediction.gaussians, keep=selection.keep, comments=comments, layout=layout
        )
        fields = {"gaussians": selection.summary()}
        artifacts.append(Artifact(None, GAUSSIAN_OUTPUT, data, *EXTRAS[GAUSSIAN_OUTPUT], fields))
        warnings += selection.warnings
    rank = {name: position for position, name in enumerate(request.outputs)}
    return sorted(artifacts, key=lambda artifact: rank[artifact.name]), warnings


def _encode_points(
    request: RunRequest, prediction: Prediction, images: list[DecodedImage], options: SceneOptions
) -> tuple[list[Artifact], list[str]]:
    """The requested files of the fused points, in the order requested."""
    names = [name for name in request.outputs if name in SCENE_OUTPUTS]
    pixels = [np.asarray(image.image.convert("RGB")) for image in images]
    points = fuse(prediction, pixels, options, tracks="colmap" in names)
    fields = {"scene": points.summary()}
    writers = {
        "scene_ply": lambda: ply.scene_ply(points, prediction.units),
        "scene_glb": lambda: glb.scene_glb(points, prediction),
        "colmap": lambda: colmap.colmap_zip(
            points, prediction, pixels, options.colmap_text, options.colmap_images
        ),
    }
    artifacts = [Artifact(None, name, writers[name](), *EXTRAS[name], fields=fields)
                 for name in names]  # fmt: skip
    return artifacts, points.warnings
