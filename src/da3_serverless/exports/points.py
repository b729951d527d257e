"""All views of a prediction fused into one filtered point cloud in world coordinates, in which
every point is an original pixel: it keeps its view, row and column, so it projects back onto
that pixel (docs/ARCHITECTURE.md §7 has the conventions).

- Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5); at depth d it is the point
  d · K⁻¹ [j + 0.5, i + 0.5, 1] of its camera.
- World frame: the frame of the prediction's extrinsics (the first view's camera, or the given
  poses' frame); a single view without extrinsics is its own camera frame.
- Filters, in this order: invalid pixels (non-finite or non-positive depth, non-finite
  confidence); sky (models that predict sky, unless `keep_sky`); depth edges (`remove_edges`: a
  pixel whose depth differs from one of its 3x3 neighbours by more than 5 % of its own depth);
  confidence below the `conf_percentile`-th percentile (numpy's linear method) of the pixels
  left in all views (models with confidence only); then at most `max_points` by a voxel grid
  that keeps the first point (in view, row, column order) of each occupied voxel and never
  averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from da3_serverless.exports.encoding import SKY_THRESHOLD
from da3_serverless.inference.prediction import Prediction

EDGE_TOLERANCE = 0.05  # relative depth jump to a 3x3 neighbour that marks an edge
FILTERS = ("invalid", "sky", "edges", "confidence", "voxel")
DEFAULT_MAX_POINTS = 200_000
DEFAULT_CONF_PERCENTILE = 40.0
# The voxel search stops once it keeps at least this share of max_points (or after MAX_STEPS).
GOOD_ENOUGH = 0.9
TARGET_SHARE = 0.96  # each step aims a little below max_points
MAX_STEPS = 10
# Voxel keys are three cell indices packed in one int64: at most 2**20 cells per axis.
MAX_CELLS_PER_AXIS = 2**20
# Host memory for request budgets, measured with tracemalloc (2 views of 1208 x 680): fusing
# peaks at 66 bytes per input pixel (masks, indices, back-projection, voxel keys; less when edge
# removal drops pixels early); the three files peak at 245 bytes per kept point while written
# (PLY 19, GLB 16, COLMAP 83 + trimesh's copies) and keep 150, plus their base64 in the
# response (200).
FUSE_BYTES_PER_PIXEL = 72
FILE_BYTES_PER_POINT = 450


@dataclass(frozen=True)
class SceneOptions:
    """The request's scene options (see the README's request table)."""

    conf_percentile: float = DEFAULT_CONF_PERCENTILE
    max_points: int = DEFAULT_MAX_POINTS
    keep_sky: bool = False
    remove_edges: bool = True
    colmap_text: bool = False
    colmap_images: str = "png"  # "png" or "jpg"
    gaussians_compact: bool = False


@dataclass
class MergedObservations:
    """Pixels of other views that the voxel grid merged into kept points: for each kept point,
    the first pixel (in row, column order) of every other view that fell in its voxel. K
    observations sorted by (point, view): `point` (K,) int64 index into the `ScenePoints`;
    `view`, `row`, `col` (K,) int32, the pixel."""

    point: np.ndarray
    view: np.ndarray
    row: np.ndarray
    col: np.ndarray

    def __len__(self) -> int:
        return len(self.point)


@dataclass
class ScenePoints:
    """The fused cloud: M points sorted by (view, row, column), with what each filter removed."""

    xyz: np.ndarray  # (M, 3) float32, world coordinates
    rgb: np.ndarray  # (M, 3) uint8
    confidence: np.ndarray  # (M,) float32; NaN for models without confidence
    view: np.ndarray  # (M,) int32, source view
    row: np.ndarray  # (M,) int32, source pixel row i
    col: np.ndarray  # (M,) int32, source pixel column j
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    confidence_threshold: float | None = None  # None: no confidence filter applied
    voxel_size: float | None = None  # None: no thinning was needed
    warnings: list[str] = field(default_factory=list)
    merged: MergedObservations | None = None  # with `fuse(..., tracks=True)` and thinning

    def __len__(self) -> int:
        return len(self.xyz)

    def summary(self) -> dict:
        """The response's `scene` object."""
        return {
            "points": len(self),
            "removed": dict(self.removed),
            "confidence_threshold": self.confidence_threshold,
            "voxel_size": self.voxel_size,
        }


def scene_bytes(pixels: int, max_points: int) -> int:
    """Host memory of the scene outputs of views holding `pixels` input pixels in all, with at
    most `max_points` points: fusing, then the three files and their base64 (an upper bound:
    fusing is done before the files are written). For request budgets."""
    return FUSE_BYTES_PER_PIXEL * pixels + FILE_BYTES_PER_POINT * max_points


def view_pose(prediction: Prediction, index: int) -> np.ndarray:
    """View `index`'s world-to-camera (3, 4) float64; identity for a single view without one."""
    if prediction.extrinsics is None:
        if len(prediction) > 1:
            raise ValueError("several views without extrinsics have no common frame")
        return np.eye(4)[:3]
    return np.asarray(prediction.extrinsics[index], dtype=np.float64)


@dataclass
class PixelSelection:
    """The pixels of every view that pass the pixel filters (all but the voxel grid): `kept`,
    their flat indices per view in ascending order; `reasons`, per view an (H, W) uint8 map of
    the filter that removed each pixel (1 + its index in FILTERS; 0 for a kept pixel); what each
    filter `removed`; the confidence `threshold` (None when not applied); `warnings`."""

    kept: list[np.ndarray]
    reasons: list[np.ndarray]
    removed: dict[str, int]
    threshold: float | None
    warnings: list[str]


def select_pixels(prediction: Prediction, options: SceneOptions) -> PixelSelection:
    """The invalid, sky, edge and confidence filters (the module docstring's order) over every
    view of `prediction`. The 3D Gaussians use it too, on maps at the network's grid."""
    removed = dict.fromkeys(FILTERS, 0)
    reasons = [_pixel_filters(prediction, i, options, removed) for i in range(len(prediction))]
    kept = [np.flatnonzero(reason == 0) for reason in reasons]
    warnings: list[str] = []
    threshold = None
    if prediction.confidence is None:
        if options.conf_percentile > 0:
            warnings.append(
                "this model predicts no confidence: conf_percentile is not applied to the scene"
            )
    else:
        kept, threshold = _confidence_filter(
            prediction, kept, reasons, options.conf_percentile, removed
        )
    return PixelSelection(kept, reasons, removed, threshold, warnings)


def fuse(
    prediction: Prediction,
    images: Sequence[np.ndarray],
    options: SceneOptions,
    tracks: bool = False,
) -> ScenePoints:
    """The fused, filtered cloud of all views. `images` are the upright (H, W, 3) uint8 inputs,
    one per view at its depth map's size. `tracks`: also the pixels of other views that the
    voxel grid merged into each kept point (`ScenePoints.merged`; for COLMAP's tracks). Raises
    ValueError without intrinsics, or for several views without extrinsics (no common
    frame)."""
    if prediction.intrinsics is None:
        raise ValueError("a scene needs intrinsics: send them, or use a model with a camera")
    selection = select_pixels(prediction, options)
    kept, removed = selection.kept, selection.removed
    views = [_view_points(prediction, images, index, pixels) for index, pixels in enumerate(kept)]
    columns = [np.concatenate(parts) for parts in zip(*views, strict=True)]
    xyz, rgb, confidence, view, row, col = columns
    chosen, voxel_size = voxel_thin(xyz, options.max_points, footprint(prediction, kept))
    removed["voxel"] = len(xyz) - len(chosen)
    points = ScenePoints(
        xyz[chosen], rgb[chosen], confidence[chosen], view[chosen], row[chosen], col[chosen],
        removed, selection.threshold, voxel_size, selection.warnings,
    )  # fmt: skip
    if tracks and voxel_size is not None:
        points.merged = merged_observations(xyz, view, row, col, chosen, voxel_size)
    return points


def merged_observations(
    xyz: np.ndarray,
    view: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    chosen: np.ndarray,
    size: float,
) -> MergedObservations:
    """For the points `chosen` by `voxel_thin(xyz, ...)` with voxel `size` (each its voxel's
    first point), the first point of every other view in the same voxel."""
    keys = _Grid(xyz).keys(size)  # the very keys voxel_thin chose with
    order = np.argsort(keys, kind="stable")  # within a voxel: ascending point index
    ordered = keys[order]
    del keys
    new = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    del ordered
    firsts = order[new]
    if not np.array_equal(np.sort(firsts), chosen):
        raise ValueError("the voxel grid does not match the chosen points")
    voxel = np.cumsum(new) - 1  # voxel number of order[i]
    kept_at = np.searchsorted(chosen, firsts)  # voxel -> index into the kept points
    rep_view = view[firsts][voxel]
    other = rep_view != view[order]  # a pixel of another view than the kept point's
    candidates, voxels = order[other], voxel[other]
    pair = voxels * (int(view.max()) + 1) + view[candidates]
    _, first = np.unique(pair, return_index=True)  # by (voxel, view); first = lowest index
    picked, voxels = candidates[first], voxels[first]
    point = kept_at[voxels]
    by_point = np.lexsort((view[picked], point))
    picked = picked[by_point]
    return MergedObservations(
        point[by_point].astype(np.int64), view[picked], row[picked], col[picked]
    )


def _pixel_filters(
    prediction: Prediction, index: int, options: SceneOptions, removed: dict[str, int]
) -> np.ndarray:
    """View `index`'s (H, W) uint8 map of the filter that removed each pixel, of the invalid,
    sky and edge filters (`PixelSelection.reasons`; 0 where all pass)."""
    depth = prediction.depth[index]
    valid = np.isfinite(depth) & (depth > 0)
    if prediction.confidence is not None:
        valid &= np.isfinite(prediction.confidence[index])
    reasons = np.zeros(np.shape(depth), dtype=np.uint8)
    _drop(reasons, ~valid, "invalid", removed)
    if prediction.sky is not None and not options.keep_sky:
        _drop(reasons, prediction.sky[index] >= SKY_THRESHOLD, "sky", removed)
    if options.remove_edges:
        _drop(reasons, depth_edges(depth), "edges", removed)
    return reasons


def _drop(reasons: np.ndarray, drop: np.ndarray, name: str, removed: dict[str, int]) -> None:
    """Mark the pixels of `drop` that no earlier filter removed as removed by filter `name`."""
    newly = drop & (reasons == 0)
    removed[name] += int(np.count_nonzero(newly))
    reasons[newly] = FILTERS.index(name) + 1


def depth_edges(depth: np.ndarray, tolerance: float = EDGE_TOLERANCE) -> np.ndarray:
    """(H, W) bool: pixels whose depth differs from one of their 3x3 neighbours by more than
    `tolerance` times their own depth (NaN neighbours never count). Computed from the
    3x3 maximum and minimum (separable, NaN-ignoring), which differ from the pixel by more than
    the tolerance exactly when some neighbour does."""
    depth = np.asarray(depth, dtype=np.float32)
    padded = np.pad(depth, 1, mode="edge")
    limit = np.float32(tolerance) * depth
    with np.errstate(invalid="ignore"):
        high = _window3(padded, np.fmax)
        low = _window3(padded, np.fmin)
        return ((high - depth) > limit) | ((depth - low) > limit)


def _window3(padded: np.ndarray, pick) -> np.ndarray:
    """`pick` (np.fmax or np.fmin) over each 3x3 window of an edge-padded (H+2, W+2) map."""
    rows = pick(pick(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    return pick(pick(rows[:-2], rows[1:-1]), rows[2:])


def _confidence_filter(
    prediction: Prediction,
    kept: list[np.ndarray],
    reasons: list[np.ndarray],
    percentile: float,
    removed: dict[str, int],
) -> tuple[list[np.ndarray], float | None]:
    """Drop the pixels below the `percentile`-th percentile of the confidence of all pixels
    left in all views (marking them in `reasons`); returns the surviving indices and the
    threshold."""
    values = [prediction.confidence[i].reshape(-1)[pixels] for i, pixels in enumerate(kept)]
    every = np.concatenate(values)
    if every.size == 0:
        return kept, None
    threshold = np.percentile(every, percentile)
    code = FILTERS.index("confidence") + 1
    survivors = []
    for pixels, value, reason in zip(kept, values, reasons, strict=True):
        survivors.append(pixels[value >= threshold])
        reason.reshape(-1)[pixels[value < threshold]] = code
    removed["confidence"] += every.size - sum(len(s) for s in survivors)
    return survivors, float(threshold)


def _view_points(
    prediction: Prediction, images: Sequence[np.ndarray], index: int, pixels: np.ndarray
) -> tuple[np.ndarray, ...]:
    """(xyz, rgb, confidence, view, row, col) of view `index`'s pixels at flat `pixels`."""
    depth = prediction.depth[index]
    image = np.asarray(images[index])
    if image.shape != (*depth.shape, 3) or image.dtype != np.uint8:
        raise ValueError(f"view {index}: need a {depth.shape} RGB uint8 image, got {image.shape}")
    rows, cols = np.divmod(pixels, depth.shape[1])
    z = depth.reshape(-1)[pixels].astype(np.float32)
    # x_world = R^T (z K^-1 [u, v, 1] - t) as one affine map of (u z, v z, z), in float32 (the
    # file's precision; a few 1e-7 relative, far below a hundredth of a pixel).
    pose = view_pose(prediction, index)
    rotation_t = pose[:, :3].T
    matrix = rotation_t @ np.linalg.inv(np.asarray(prediction.intrinsics[index], np.float64))
    offset = -rotation_t @ pose[:, 3]
    u = (cols.astype(np.float32) + np.float32(0.5)) * z
    v = (rows.astype(np.float32) + np.float32(0.5)) * z
    xyz = np.empty((len(pixels), 3), dtype=np.float32)
    for axis in range(3):  # per axis: (M, 3) @ (3, 3) is much slower here
        m = matrix[axis].astype(np.float32)
        xyz[:, axis] = m[0] * u + m[1] * v + m[2] * z + np.float32(offset[axis])
    rgb = image.reshape(-1, 3)[pixels]
    if prediction.confidence is None:
        confidence = np.full(len(pixels), np.nan, dtype=np.float32)
    else:
        confidence = prediction.confidence[index].reshape(-1)[pixels].astype(np.float32)
    view = np.full(len(pixels), index, dtype=np.int32)
    return xyz, rgb, confidence, view, rows.astype(np.int32), cols.astype(np.int32)


def footprint(prediction: Prediction, kept: list[np.ndarray]) -> float:
    """The area the kept pixels cover, each (z / f)² square facing its camera: about the
    surface the cloud samples (less where views overlap, more where surfaces slant). Estimated
    from every 16th kept pixel: it is only the voxel search's first guess."""
    area = 0.0
    for index, pixels in enumerate(kept):
        k = np.asarray(prediction.intrinsics[index], dtype=np.float64)
        z = prediction.depth[index].reshape(-1)[pixels[::16]].astype(np.float64)
        area += 16 * float(np.dot(z, z)) / (k[0, 0] * k[1, 1])
    return area


def voxel_thin(
    xyz: np.ndarray, max_points: int, area: float | None = None
) -> tuple[np.ndarray, float | None]:
    """Indices (ascending) of at most `max_points` of the (M, 3) points: the first point of each
    occupied cell of a cubic voxel grid anchored at the cloud's minimum corner, with the
    smallest voxel size found that keeps at most `max_points`; and that size (None when all
    points are kept). `area`, the surface the points sample, makes the first guess; without it
    the bounding box's two longest sides do. Deterministic: the same points give the same
    indices."""
    if len(xyz) <= max_points:
        return np.arange(len(xyz)), None
    grid = _Grid(xyz)
    size = max(
        math.sqrt(area / max_points) if area else grid.first_guess(max_points), grid.smallest
    )
    target = TARGET_SHARE * max_points
    fits = over = previous = None  # (size, count): the best sizes that fit, did not, the last
    for _ in range(MAX_STEPS):
        count = _occupied(grid.keys(size))
        if count <= max_points:
            fits = (size, count) if fits is None or size < fits[0] else fits
            if count >= GOOD_ENOUGH * max_points:
                break
        else:
            over = (size, count) if over is None or size > over[0] else over
        measured = (size, count)
        if fits is not None and over is not None:
            size = _between(over, fits, target)
        else:
            size = max(_extrapolate(previous, measured, target), grid.smallest)
        previous = measured
    while fits is None:  # doubling: a voxel larger than the cloud holds it all
        size = 2 * over[0]
        count = _occupied(grid.keys(size))
        if count <= max_points:
            fits = (size, count)
        else:
            over = (size, count)
    return _first_per_voxel(grid.keys(fits[0])), fits[0]


def _extrapolate(previous, current, target: float) -> float:
    """The next size from the last one: occupied voxels fall as size^-k, with k = 2 for points
    on surfaces until two steps measure it (smaller while voxels are about as small as the
    gaps between points)."""
    size, count = current
    exponent = 2.0
    if previous is not None and previous[0] != size and previous[1] != count:
        measured = math.log(previous[1] / count) / math.log(size / previous[0])
        exponent = min(max(measured, 0.25), 4.0)
    return size * (count / target) ** (1 / exponent)


def _between(over, fits, target: float) -> float:
    """A size between a bracket's ends (sizes that give more, and at most, max_points): where
    the line through both ends in log-log crosses `target`, else their geometric mean."""
    (small, many), (large, few) = over, fits
    if many > few and small < large:
        share = math.log(many / target) / math.log(many / few)
        guess = small * (large / small) ** share
        if small < guess < large:
            return guess
    return math.sqrt(small * large)


class _Grid:
    """The points as contiguous per-axis float32 offsets from their minimum corner."""

    def __init__(self, xyz: np.ndarray):
        columns = np.ascontiguousarray(np.asarray(xyz, dtype=np.float32).T)
        self.offsets = [axis - axis.min() for axis in columns]
        self.sides = np.array([float(axis.max()) for axis in self.offsets])
        # Keys pack three cell indices in one int64: at most MAX_CELLS_PER_AXIS per axis.
        self.smallest = max(float(self.sides.max()) / MAX_CELLS_PER_AXIS, 1e-30)
        self.count = len(columns[0])

    def first_guess(self, max_points: int) -> float:
        """The size at which the bounding box's two longest sides hold `max_points` cells."""
        long_sides = np.sort(self.sides)[1:]
        return math.sqrt(float(long_sides[0] * long_sides[1]) / max_points)

    def keys(self, size: float) -> np.ndarray:
        """One int64 per point naming its voxel of edge `size`."""
        keys = np.zeros(self.count, dtype=np.int64)
        scale = np.float32(1.0 / size)
        for offsets, side in zip(self.offsets, self.sides, strict=True):
            cells = np.floor(offsets * scale).astype(np.int64)
            keys *= int(side // size) + 2  # + 2: float32 rounding may reach one cell further
            keys += cells
        return keys


def _occupied(keys: np.ndarray) -> int:
    ordered = np.sort(keys)
    return 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))


def _first_per_voxel(keys: np.ndarray) -> np.ndarray:
    """Ascending indices of the first point of each voxel (the smallest index with its key)."""
    order = np.argsort(keys)
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    first = np.minimum.reduceat(order, starts)
    first.sort()
    return first
