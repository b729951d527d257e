"""Anchors: what a caller knows about the scene's true scale, and fitting the answer to it.

A request's `anchors` (docs/ARCHITECTURE.md §9) may hold any of
- `points`: known depths in metres at pixels of the upright input image, one list per view
  (`[[x, y, depth_m], ...]`; a flat list of triples for a one-view request);
- `sparse_depth`: depth maps (16-bit PNG times `scale`, or a float `.npy` times `scale`; zeros
  unknown) covering the same field of view as a view at any resolution, e.g. an iPhone LiDAR
  or ARKit map, optionally in sensor orientation (`orientation`, EXIF values 1-8);
- `distance`: the metres between the 3D points of two pixels (`[view, x, y]` each).

`decode_anchor_maps` decodes the maps before the model runs (bad input fails early);
`fit_anchors` samples the prediction at every anchor, fits one scale (scale and shift in
inverse depth for the monocular relative model) robustly, applies it to the whole prediction
and reports the fit. With given extrinsics the poses fix the scale: anchors are checked and
reported, not fitted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator

from da3_serverless.api.errors import ServiceError
from da3_serverless.inference.prediction import Prediction
from da3_serverless.inference.scale_fit import (
    MIN_INLIER_SHARE,
    OUTLIER_LOG,
    Fit,
    apply_inverse_affine,
    apply_scale,
    fit_inverse_affine,
    fit_scale,
)

MAX_ANCHOR_POINTS = 10_000  # per view
MAX_DISTANCES = 1_000
MAX_ANCHOR_MAP_PIXELS = 2048 * 2048
MAX_REPORTED_REJECTS = 20
SKY_PROBABILITY = 0.5  # anchors on sky pixels are not used
_STRICT = ConfigDict(extra="forbid", strict=True)


class SparseDepth(BaseModel):
    """A depth map of one view, at any resolution, covering the view's field of view."""

    model_config = _STRICT

    view: int = Field(default=0, ge=0)
    base64: str = Field(description="16-bit PNG or float .npy, raw base64 or a data URI")
    scale: FiniteFloat = Field(default=1.0, gt=0, description="metres per stored unit")
    orientation: int = Field(default=1, ge=1, le=8, description="EXIF orientation of the map")


class Distance(BaseModel):
    """The metres between the 3D points of two pixels, `[view, x, y]` each."""

    model_config = _STRICT

    a: list[FiniteFloat] = Field(min_length=3, max_length=3)
    b: list[FiniteFloat] = Field(min_length=3, max_length=3)
    meters: FiniteFloat = Field(gt=0)


class Anchors(BaseModel):
    """Known depths and distances that fix the answer's scale."""

    model_config = _STRICT

    points: list[list[list[FiniteFloat]]] | None = None
    sparse_depth: list[SparseDepth] | None = Field(default=None, max_length=16)
    distance: list[Distance] | None = Field(default=None, max_length=MAX_DISTANCES)

    @field_validator("points", mode="before")
    @classmethod
    def _wrap_one_view(cls, value: object) -> object:
        flat = (
            isinstance(value, list)
            and value
            and all(isinstance(p, list) and not any(isinstance(x, list) for x in p) for p in value)
        )
        return [value] if flat else value

    @field_validator("points")
    @classmethod
    def _check_points(cls, value: list | None) -> list | None:
        for view in value or []:
            if len(view) > MAX_ANCHOR_POINTS:
                raise ValueError(f"at most {MAX_ANCHOR_POINTS} anchor points per view")
            if any(len(p) != 3 or p[2] <= 0 for p in view):
                raise ValueError("each anchor point is [x, y, depth_m] with depth_m > 0")
        return value


@dataclass
class _Observations:
    """Pairs (predicted, known) with weights, and which anchor each came from."""

    predicted: list[float] = field(default_factory=list)
    known: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)

    def add(self, predicted: float, known: float, weight: float, label: str) -> None:
        self.predicted.append(predicted)
        self.known.append(known)
        self.weights.append(weight)
        self.labels.append(label)


def _bad(message: str) -> ServiceError:
    return ServiceError("invalid_input", f"anchors: {message}")


def _decode_map(entry: SparseDepth, where: str) -> np.ndarray:
    # api/images imports the schema, which imports this module: imported when first used
    from da3_serverless.api.images import decode_base64

    try:
        data = decode_base64(entry.base64)
    except ServiceError as error:
        raise _bad(f"{where}.base64: {error.message}") from None
    if data.startswith(b"\x93NUMPY"):
        try:
            values = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError:
            raise _bad(f"{where} is not a readable .npy file") from None
        if values.ndim != 2 or values.dtype.kind not in "fiu":
            raise _bad(f"{where} must be a 2-d numeric array (got {values.dtype} {values.shape})")
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "PNG" or image.width * image.height > MAX_ANCHOR_MAP_PIXELS:
                    raise _bad(f"{where} must be a 16-bit PNG of at most 2048x2048 or a .npy")
                values = np.asarray(image.convert("I") if image.mode != "I;16" else image)
        except OSError:
            raise _bad(f"{where} is neither a PNG nor a .npy file") from None
    if values.size > MAX_ANCHOR_MAP_PIXELS:
        raise _bad(f"{where} has {values.size} pixels; at most {MAX_ANCHOR_MAP_PIXELS}")
    return _upright(values.astype(np.float64), entry.orientation) * entry.scale


def _upright(values: np.ndarray, orientation: int) -> np.ndarray:
    """The map turned as its EXIF orientation says, the way images are (Pillow's transposes)."""
    method = _TRANSPOSES.get(orientation)
    if method is None:
        return values
    turned = Image.fromarray(values.astype(np.float32)).transpose(method)
    return np.asarray(turned, dtype=np.float64)


_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}  # fmt: skip


def decode_anchor_maps(
    anchors: Anchors | None, views: int, max_chars: int
) -> list[tuple[int, np.ndarray]]:
    """The request's sparse depth maps, upright and in metres, with their view; refuses a map
    of a view the request does not have, one longer than `max_chars` of base64, or one that
    cannot be read."""
    maps = []
    for i, entry in enumerate((anchors.sparse_depth or []) if anchors else []):
        where = f"sparse_depth[{i}]"
        if len(entry.base64) > max_chars:
            raise ServiceError(
                "image_too_large",
                f"anchors: {where}.base64 is {len(entry.base64)} characters; this server "
                f"accepts at most {max_chars} (MAX_BASE64_CHARS): send a smaller map",
            )
        if entry.view >= views:
            raise _bad(f"{where}.view is {entry.view} but the request has {views} view(s)")
        maps.append((entry.view, _decode_map(entry, where)))
    return maps


class _Sampler:
    """The prediction at a pixel of the upright input image: depth, a weight (the view's
    confidence relative to its median) and the 3D point in the world frame."""

    def __init__(self, prediction: Prediction):
        self.prediction = prediction
        confidence = prediction.confidence
        self.medians = (
            [float(np.median(c)) or 1.0 for c in confidence] if confidence is not None else None
        )

    def pixel(self, view: int, x: float, y: float, where: str) -> tuple[int, int]:
        n, height, width = self.prediction.depth.shape
        if not 0 <= view < n or view != int(view):
            raise _bad(f"{where} names view {view:g} but the request has {n} view(s)")
        if not (0 <= x < width and 0 <= y < height):
            raise _bad(
                f"{where} is at ({x:g}, {y:g}), outside view {int(view)}'s {width}x{height} "
                "image: give pixels of the upright (EXIF-applied) input image"
            )
        return int(y), int(x)

    def usable(self, view: int, row, col) -> np.ndarray:
        depth = self.prediction.depth[view][row, col]
        ok = np.isfinite(depth) & (depth > 0)
        if self.prediction.sky is not None:
            ok &= self.prediction.sky[view][row, col] < SKY_PROBABILITY
        return ok

    def weight(self, view: int, row, col) -> np.ndarray:
        if self.medians is None:
            return np.ones(np.shape(row))
        relative = self.prediction.confidence[view][row, col] / self.medians[view]
        return np.clip(relative, 0.05, 20.0)

    def world_point(self, view: int, x: float, y: float, row: int, col: int) -> np.ndarray:
        k, pose = self.prediction.intrinsics[view], self.prediction.extrinsics[view]
        ray = np.linalg.solve(k.astype(np.float64), np.array([x, y, 1.0]))
        camera = ray * float(self.prediction.depth[view][row, col])
        rotation, translation = pose[:, :3].astype(np.float64), pose[:, 3].astype(np.float64)
        return rotation.T @ (camera - translation)


def _gather_points(anchors: Anchors, sampler: _Sampler, out: _Observations) -> None:
    for view, points in enumerate(anchors.points or []):
        for i, (x, y, depth) in enumerate(points):
            where = f"points[{view}][{i}]"
            row, col = sampler.pixel(view, x, y, where)
            if not sampler.usable(view, row, col):
                out.unusable.append(where)
                continue
            predicted = float(sampler.prediction.depth[view][row, col])
            out.add(predicted, depth, float(sampler.weight(view, row, col)), where)


def _gather_maps(maps: list, sampler: _Sampler, out: _Observations) -> None:
    _, height, width = sampler.prediction.depth.shape
    for i, (view, values) in enumerate(maps):
        rows, cols = np.nonzero(np.isfinite(values) & (values > 0))
        if rows.size == 0:
            out.unusable.append(f"sparse_depth[{i}]")
            continue
        map_h, map_w = values.shape  # the same field of view: pixel centres scale
        image_rows = np.minimum(((rows + 0.5) * height / map_h).astype(int), height - 1)
        image_cols = np.minimum(((cols + 0.5) * width / map_w).astype(int), width - 1)
        ok = sampler.usable(view, image_rows, image_cols)
        predicted = sampler.prediction.depth[view][image_rows[ok], image_cols[ok]]
        weights = sampler.weight(view, image_rows[ok], image_cols[ok])
        out.predicted += predicted.astype(np.float64).tolist()
        out.known += values[rows[ok], cols[ok]].tolist()
        out.weights += np.broadcast_to(weights, predicted.shape).astype(np.float64).tolist()
        out.labels += [f"sparse_depth[{i}]"] * int(ok.sum())


def _gather_distances(anchors: Anchors, sampler: _Sampler, out: _Observations) -> None:
    prediction = sampler.prediction
    if anchors.distance and (prediction.intrinsics is None or prediction.extrinsics is None):
        raise _bad(
            "distance anchors need a model that predicts cameras; this model has none: "
            "give points or sparse_depth instead"
        )
    for i, anchor in enumerate(anchors.distance or []):
        where, ends = f"distance[{i}]", []
        for (view, x, y), side in ((anchor.a, "a"), (anchor.b, "b")):
            row, col = sampler.pixel(int(view), x, y, f"{where}.{side}")
            ends.append((int(view), x, y, row, col))
        if not all(sampler.usable(v, r, c) for v, _, _, r, c in ends):
            out.unusable.append(where)
            continue
        a, b = (sampler.world_point(*end) for end in ends)
        length = float(np.linalg.norm(a - b))
        if length <= 0:
            out.unusable.append(where)
            continue
        weight = min(float(sampler.weight(v, r, c)) for v, _, _, r, c in ends)
        out.add(length, anchor.meters, weight, where)


def _rejected(observations: _Observations, inliers: np.ndarray) -> list[str]:
    """The anchors with outliers, each named once (a map with how many of its pixels)."""
    counts: dict[str, list[int]] = {}
    for label, kept in zip(observations.labels, inliers.tolist(), strict=True):
        tally = counts.setdefault(label, [0, 0])
        tally[0] += 1
        tally[1] += 0 if kept else 1
    named = [
        f"{label} ({bad} of {total} pixels)" if label.startswith("sparse") else label
        for label, (total, bad) in counts.items()
        if bad
    ]
    return named[:MAX_REPORTED_REJECTS]


def _report(fit: Fit, observations: _Observations, fitted: bool) -> dict:
    predicted = np.asarray(observations.predicted)
    known = np.asarray(observations.known)
    residuals = np.abs((fit.predict(predicted) if fitted else predicted) - known)[fit.inliers]
    percentiles = np.percentile(residuals, [50, 90, 100]) if residuals.size else [0.0] * 3
    return {
        "fitted": fitted,
        "model": "scale" if fit.shift is None else "inverse_depth_scale_shift",
        "scale": fit.scale if fitted else 1.0,
        "shift": fit.shift if fitted else None,
        "suggested_scale": None if fitted or fit.shift is not None else fit.scale,
        "observations": len(observations.labels),
        "inliers": int(fit.inliers.sum()),
        "outliers": int((~fit.inliers).sum()),
        "residual_m": dict(zip(("p50", "p90", "max"), map(float, percentiles), strict=True)),
        "rejected": _rejected(observations, fit.inliers),
        "unusable": observations.unusable[:MAX_REPORTED_REJECTS],
    }


def fit_anchors(
    anchors: Anchors, maps: list[tuple[int, np.ndarray]], prediction: Prediction
) -> tuple[Prediction, dict]:
    """Fit the prediction to the anchors and apply the fit (see the module's docstring);
    returns the new prediction and the report for the response. Refuses anchors that fall
    outside the images, anchors none of which can be used, and anchors that disagree: less
    than half of their weight within about 22 % of one fit."""
    sampler, observations = _Sampler(prediction), _Observations()
    _gather_points(anchors, sampler, observations)
    _gather_maps(maps, sampler, observations)
    _gather_distances(anchors, sampler, observations)
    if not observations.labels:
        raise _bad(
            "none of the anchors can be used (they fall on sky or invalid pixels, or the "
            "maps are empty): give anchors on solid surfaces"
        )
    monocular = prediction.units == "relative" and prediction.extrinsics is None
    if monocular and anchors.distance:
        raise _bad("distance anchors need a model that predicts cameras; use points instead")
    fitter = fit_inverse_affine if monocular else fit_scale
    values = (np.asarray(v, np.float64) for v in (observations.predicted, observations.known))
    fit = fitter(*values, np.asarray(observations.weights, np.float64))
    fitted = prediction.units != "pose_units"
    if fitted and fit.inlier_share < MIN_INLIER_SHARE:
        raise _bad(
            f"they disagree with the image: only {fit.inlier_share:.0%} of their weight fits "
            f"one scale within {np.expm1(OUTLIER_LOG):.0%} (rejected: "
            f"{', '.join(_rejected(observations, fit.inliers)) or 'none'}); check their units "
            "(scale), views and pixels (upright image pixels)"
        )
    report = _report(fit, observations, fitted)
    if not fitted:
        return prediction, report
    if fit.shift is None:
        scaled = apply_scale(prediction, fit.scale)
    else:
        scaled = apply_inverse_affine(prediction, fit.scale, fit.shift)
    return replace(scaled, is_metric=True, units="m"), report
