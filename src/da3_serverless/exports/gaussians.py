"""3D Gaussians -> a 3D Gaussian Splatting PLY file (bytes), and the request's filters applied
to them (`select_gaussians`).

One binary little-endian `vertex` element of float32 properties, in one of two layouts:

- "inria" (the default): the file INRIA's 3DGS code (`load_ply` at its default `sh_degree` 3)
  and SIBR's viewer read: `element vertex` is the header's third line (SIBR reads the count
  there; comments come after the properties), then x, y, z, nx, ny, nz (zeros), f_dc_0..2,
  f_rest_0..44, opacity, scale_0..2, rot_0..3. f_rest holds the spherical-harmonic
  coefficients of degrees 1 to 3 in INRIA's order, every rest coefficient of red, then of
  green, then of blue (f_rest_{15 c + k - 1} is coefficient k of channel c): the network's
  degrees 1 and 2 in the world frame (rotated with every frame change), zeros for degree 3.
- "compact": x, y, z, f_dc_0..2, opacity, scale_0..2, rot_0..3 (degree-0 colour only, no
  normals; comments before the element), about a quarter of the size.

Values are stored before the activations those readers apply, i.e. inverted:

- opacity: logit(opacity), opacities clipped to [1e-6, 1 - 1e-6] first;
- scale_i: log(|scale_i|) (a Gaussian's covariance depends on scale^2), at least log(1e-12);
- rot_0..3: the rotation quaternion (w, x, y, z) normalised ((1, 0, 0, 0) for a zero one);
- f_dc_i: (rgb_i - 0.5) / C0, C0 = 0.28209479 the degree-0 spherical-harmonic constant;
- f_rest: the coefficients as they are (no activation).

Filters (`select_gaussians`): the Gaussians are one per cell of the network's grid (h, w) per
view, while depth, confidence and sky come back at each input's size (H, W). A Gaussian is
kept when the input pixel holding its cell's centre is one the scene's pixel filters keep
(`exports.points.select_pixels`, run at input resolution exactly as for `scene_ply`: invalid,
sky unless `keep_sky`, depth edges with `remove_edges`, confidence below the scene's
`conf_percentile` threshold), and its own values are finite. That pixel is row
((2 r + 1) H) // (2 h), column ((2 c + 1) W) // (2 w): exact integer arithmetic, so the same
request keeps the same Gaussians. Then at most `max_points` by the scene's voxel grid over the
means, the first Gaussian (in view, row, column order) of each voxel kept. Thinned Gaussians
keep their sizes, so a thinned file renders sparser rather than blurrier.

Pure: arrays in, bytes out; no files, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from da3_serverless.exports.points import (
    FILTERS,
    SceneOptions,
    footprint,
    select_pixels,
    voxel_thin,
)
from da3_serverless.inference.prediction import Prediction

PROPERTIES = (
    "x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip
REST_COUNT = 15  # coefficients of degrees 1 to 3 per colour channel
INRIA_PROPERTIES = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
    *(f"f_rest_{index}" for index in range(3 * REST_COUNT)),
    "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip
LAYOUTS = ("inria", "compact")
# Degree-0 real spherical harmonic, 1 / (2 sqrt(pi)) (`model.spherical_harmonics.SH_C0`; not
# imported, so this writer stays free of torch).
SH_C0 = 0.28209479177387814
_OPACITY_EPS = 1e-6
_MIN_SCALE = 1e-12
# Host memory for request budgets, measured with tracemalloc (bench/gaussians.py --memory; 2
# views of 1208 x 680 at process_res 504 and 252): the prediction holds 152 bytes per grid cell
# (38 float32: 14, and 24 spherical-harmonic coefficients of degrees 1 and 2); selecting peaks
# at 26 bytes per input pixel (the scene's pixel filters at input resolution, whose kept indices
# stay until the end) and about 60 per cell (reasons, masks, indices, means and voxel keys);
# writing the INRIA layout at about 1200 per Gaussian written (float64 columns and their parts,
# the float32 file of 248 bytes per Gaussian, and its base64 in the response; the compact
# layout takes about a fifth of that).
HELD_BYTES_PER_CELL = 152
SELECT_BYTES_PER_PIXEL = 32
SELECT_BYTES_PER_CELL = 64
FILE_BYTES_PER_GAUSSIAN = 1280


def gaussian_bytes(pixels: int, cells: int, max_points: int) -> int:
    """Host memory of `gaussians_ply` for views holding `pixels` input pixels and `cells` grid
    cells in all (views x h x w), at most `max_points` written: the Gaussians held, selecting,
    and the file with its base64 (an upper bound: the steps follow one another). For request
    budgets."""
    per_cell = HELD_BYTES_PER_CELL + SELECT_BYTES_PER_CELL
    written = min(cells, max_points)
    return SELECT_BYTES_PER_PIXEL * pixels + per_cell * cells + FILE_BYTES_PER_GAUSSIAN * written


class GaussianArrays(Protocol):
    """Anything with these arrays, sharing leading dimensions (..., e.g. views x rows x columns):
    means (..., 3), scales (..., 3) standard deviations, rotations (..., 4) quaternions (w, x, y,
    z), opacities (...) in [0, 1], colors (...,  3) RGB (DC colour, about [0, 1]), and optionally
    sh_rest (..., 3, n) spherical-harmonic coefficients of degrees 1 and up per channel (None:
    degree 0 only). Such as `inference.prediction.Gaussians`."""

    means: np.ndarray
    scales: np.ndarray
    rotations: np.ndarray
    opacities: np.ndarray
    colors: np.ndarray


def _check_shapes(gaussians: GaussianArrays, keep: np.ndarray | None) -> None:
    """ValueError unless every array (and `keep`) shares the opacities' leading dimensions."""
    shape = np.shape(gaussians.opacities)
    parts = {"means": (3,), "colors": (3,), "scales": (3,), "rotations": (4,)}
    rest = getattr(gaussians, "sh_rest", None)
    if rest is not None:
        parts["sh_rest"] = (3, min(np.shape(rest)[-1], REST_COUNT))
    for name, tail in parts.items():
        if np.shape(getattr(gaussians, name)) != (*shape, *tail):
            raise ValueError(
                f"gaussians.{name} must have shape {(*shape, *tail)} to match opacities "
                f"{shape}, got {np.shape(getattr(gaussians, name))}"
            )
    if keep is not None and np.shape(keep) != shape:
        raise ValueError(f"keep must be a boolean mask of shape {shape}, got {np.shape(keep)}")


def gaussian_columns(
    gaussians: GaussianArrays, keep: np.ndarray | None = None, layout: str = "inria"
) -> np.ndarray:
    """The PLY's values as an (M, P) float32 array in the layout's property order
    (`INRIA_PROPERTIES` or `PROPERTIES`), activations inverted.

    keep: boolean mask over the leading dimensions, which Gaussians to write (default all).
    Gaussians with any non-finite value are left out. ValueError for mismatched shapes.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_shapes(gaussians, keep)
    pick = None if keep is None else np.asarray(keep, dtype=bool).reshape(-1)

    def flat(values: np.ndarray, width: int) -> np.ndarray:
        """The kept Gaussians' values as float64 (picked first: only those are converted)."""
        values = np.asarray(values).reshape(-1, width)
        return (values if pick is None else values[pick]).astype(np.float64)

    opacity = np.clip(flat(gaussians.opacities, 1), _OPACITY_EPS, 1 - _OPACITY_EPS)
    rotations = flat(gaussians.rotations, 4)
    norm = np.linalg.norm(rotations, axis=1, keepdims=True)
    identity = np.array([1.0, 0.0, 0.0, 0.0])
    rotations = np.where(norm > 0, rotations / np.where(norm > 0, norm, 1.0), identity)
    means = flat(gaussians.means, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = [
            np.log(opacity / (1 - opacity)),
            np.log(np.maximum(np.abs(flat(gaussians.scales, 3)), _MIN_SCALE)),
            rotations,
        ]
    dc = (flat(gaussians.colors, 3) - 0.5) / SH_C0
    if layout == "compact":
        parts = [means, dc, *tail]
    else:
        parts = [means, np.zeros_like(means), dc, _rest_columns(gaussians, flat, len(means))]
        parts += tail
    columns = np.concatenate(parts, axis=1).astype(np.float32)
    return columns[np.isfinite(columns).all(axis=1)]


def _rest_columns(gaussians: GaussianArrays, flat, count: int) -> np.ndarray:
    """(count, 45) f_rest values: each channel's coefficients of degrees 1 to 3, red first
    (INRIA's order), zeros where the Gaussians have no such degree."""
    columns = np.zeros((count, 3, REST_COUNT))
    rest = getattr(gaussians, "sh_rest", None)
    if rest is not None:
        n = np.shape(rest)[-1]
        columns[:, :, :n] = flat(rest, 3 * n).reshape(count, 3, n)
    return columns.reshape(count, 3 * REST_COUNT)


def gaussians_ply(
    gaussians: GaussianArrays,
    *,
    keep: np.ndarray | None = None,
    comments: Sequence[str] = (),
    layout: str = "inria",
) -> bytes:
    """A binary 3DGS PLY of `gaussians` in `layout` ("inria" or "compact"; see the module
    docstring for both and for the stored values).

    keep: boolean mask over the Gaussians to write (default all; non-finite ones are always left
    out). comments: header comment lines (e.g. "units m"), ASCII without line breaks.
    """
    for comment in comments:
        if not comment.isascii() or "\n" in comment or "\r" in comment:
            raise ValueError(f"PLY comments must be one line of ASCII, got {comment!r}")
    columns = gaussian_columns(gaussians, keep, layout)
    element = [f"element vertex {len(columns)}"]
    remarks = [f"comment {comment}" for comment in comments]
    if layout == "compact":
        header = ["ply", "format binary_little_endian 1.0", *remarks, *element]
        header += [f"property float {name}" for name in PROPERTIES]
    else:  # the count on line 3, as SIBR reads it
        header = ["ply", "format binary_little_endian 1.0", *element]
        header += [f"property float {name}" for name in INRIA_PROPERTIES] + remarks
    header.append("end_header")
    body = columns.astype("<f4", copy=False).tobytes()
    return ("\n".join(header) + "\n").encode("ascii") + body


# ---- the request's filters -------------------------------------------------------------------


@dataclass
class GaussianSelection:
    """Which Gaussians a request keeps: `keep` (N, h, w) bool over the grid; what each filter
    removed, the confidence threshold and the voxel size (the response's `gaussians` summary:
    the scene summary's fields, counted in Gaussians); warnings."""

    keep: np.ndarray
    removed: dict[str, int]
    confidence_threshold: float | None
    voxel_size: float | None
    warnings: list[str]

    def summary(self) -> dict:
        return {
            "points": int(np.count_nonzero(self.keep)),
            "removed": dict(self.removed),
            "confidence_threshold": self.confidence_threshold,
            "voxel_size": self.voxel_size,
        }


def cell_pixels(size: int, cells: int) -> np.ndarray:
    """For each of `cells` grid cells along an axis of `size` input pixels, the input pixel
    holding the cell's centre: ((2 k + 1) size) // (2 cells), exactly."""
    return (2 * np.arange(cells, dtype=np.int64) + 1) * size // (2 * cells)


def select_gaussians(prediction: Prediction, options: SceneOptions) -> GaussianSelection:
    """The Gaussians of `prediction` that the request's scene options keep (see the module
    docstring). ValueError when the prediction has no Gaussians or no intrinsics."""
    gaussians = prediction.gaussians
    if gaussians is None or prediction.intrinsics is None:
        raise ValueError("gaussians_ply needs a prediction with Gaussians (gaussians=True)")
    views, height, width = np.shape(gaussians.opacities)
    finite = np.isfinite(gaussians.opacities)
    for name in ("means", "scales", "rotations", "colors"):
        finite &= np.isfinite(getattr(gaussians, name)).all(axis=-1)
    pixels = select_pixels(prediction, options)  # the scene's own pixel filters
    reasons = np.empty((views, height, width), dtype=np.uint8)
    for index, reason in enumerate(pixels.reasons):
        rows, cols = cell_pixels(reason.shape[0], height), cell_pixels(reason.shape[1], width)
        reasons[index] = reason[np.ix_(rows, cols)]
    reasons[~finite] = FILTERS.index("invalid") + 1  # a Gaussian that cannot be written
    counts = np.bincount(reasons.reshape(-1), minlength=len(FILTERS) + 1)
    removed = {name: int(counts[code + 1]) for code, name in enumerate(FILTERS)}
    flat = np.flatnonzero(reasons == 0)  # (view, row, column) order
    means = np.asarray(gaussians.means, dtype=np.float32).reshape(-1, 3)[flat]
    chosen, voxel_size = voxel_thin(means, options.max_points, footprint(prediction, pixels.kept))
    keep = np.zeros(views * height * width, dtype=bool)
    keep[flat[chosen]] = True
    removed["voxel"] = len(flat) - len(chosen)
    return GaussianSelection(
        keep.reshape(views, height, width), removed, pixels.threshold, voxel_size,
        pixels.warnings,
    )  # fmt: skip
