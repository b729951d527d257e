"""The numbers of the cameras a client sends, checked once the images' sizes are known
(docs/ARCHITECTURE.md §5): every value finite as float32; intrinsics a pinhole matrix with a
focal length and principal point that fit the image; extrinsics a rigid world-to-camera
transform, its rotation re-orthonormalised before use. A broken rule is `invalid_input` naming
the matrix and the rule, so no camera can make the network, the alignment or the encoders
produce NaN or infinity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import RunRequest

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Focal lengths in pixels, as a multiple of the image's longest side: 0.05 is a ~170° field of
# view, 20 a ~3° one.
FOCAL_RANGE = (0.05, 20.0)
PINHOLE_TOLERANCE = 1e-6  # skew and last row [0, 0, 1]
ROTATION_TOLERANCE = 1e-3  # max |RᵀR - I|
# Camera positions in the poses' own units; beyond this, depth aligned to them (and points
# placed in their frame) would no longer fit float32.
MAX_TRANSLATION = 1e12


def checked_cameras(request: RunRequest, sizes: Sequence[tuple[int, int]]) -> RunRequest:
    """`request` with its cameras checked against the views' `sizes` ((width, height) each, in
    the order of the views) and cleaned: exact pinhole intrinsics, re-orthonormalised
    rotations. Raises `ServiceError("invalid_input")` saying which rule failed."""
    update: dict[str, object] = {}
    if request.focal_length_px is not None:
        check_focal_length(request.focal_length_px, sizes)
    if request.intrinsics is not None:
        update["intrinsics"] = check_intrinsics(request.intrinsics, sizes).tolist()
    if request.extrinsics is not None:
        update["extrinsics"] = check_extrinsics(request.extrinsics).tolist()
    return request.model_copy(update=update) if update else request


def _refuse(message: str) -> ServiceError:
    return ServiceError("invalid_input", message)


def _finite32(values: np.ndarray, where: str) -> None:
    if not (np.abs(values) <= FLOAT32_MAX).all():  # NaN fails the comparison too
        raise _refuse(
            f"{where} holds a number that is not finite as float32 (|x| <= {FLOAT32_MAX:.4g}): "
            "send finite camera values in pixels (intrinsics) or the poses' units (extrinsics)"
        )


def _focal_bounds(width: int, height: int) -> tuple[float, float]:
    side = max(width, height)
    return FOCAL_RANGE[0] * side, FOCAL_RANGE[1] * side


def check_focal_length(focal: float | Sequence[float], sizes: Sequence[tuple[int, int]]) -> None:
    """`focal_length_px` (one number for every view, or one per view) must be finite as float32
    and within `FOCAL_RANGE` x the longest side of each view."""
    per_view = not isinstance(focal, int | float)
    focals = list(focal) if per_view else [focal] * len(sizes)
    for index, (value, (width, height)) in enumerate(zip(focals, sizes, strict=True)):
        where = f"focal_length_px[{index}]" if per_view else "focal_length_px"
        _finite32(np.array([value]), where)
        low, high = _focal_bounds(width, height)
        if not low <= value <= high:
            raise _refuse(
                f"{where} {value:.6g} is outside [{FOCAL_RANGE[0]:g}, {FOCAL_RANGE[1]:g}] "
                f"x the longest side = [{low:.6g}, {high:.6g}] px of view {index} ({width}x"
                f"{height}): give the focal length in pixels of the image as sent"
            )


def check_intrinsics(matrices: Sequence, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """(N, 3, 3) float64 pinhole matrices `[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`, one per view:
    finite as float32, no skew, last row [0, 0, 1], fx and fy within `FOCAL_RANGE` x the view's
    longest side, the principal point within [-W, 2W] x [-H, 2H]."""
    array = np.array(matrices, dtype=np.float64).reshape(-1, 3, 3)
    for index, (k, (width, height)) in enumerate(zip(array, sizes, strict=True)):
        where = f"intrinsics[{index}]"
        _finite32(k, where)
        if abs(k[0, 1]) > PINHOLE_TOLERANCE or abs(k[1, 0]) > PINHOLE_TOLERANCE:
            raise _refuse(
                f"{where} is not a pinhole matrix: K[0][1] (skew) and K[1][0] must be 0, as in "
                "[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]"
            )
        if np.abs(k[2] - (0.0, 0.0, 1.0)).max() > PINHOLE_TOLERANCE:
            raise _refuse(f"{where}: the last row must be [0, 0, 1] (is the matrix transposed?)")
        low, high = _focal_bounds(width, height)
        for name, focal in (("fx = K[0][0]", k[0, 0]), ("fy = K[1][1]", k[1, 1])):
            if not low <= focal <= high:
                raise _refuse(
                    f"{where}: the focal length {name} = {focal:.6g} px is outside "
                    f"[{FOCAL_RANGE[0]:g}, {FOCAL_RANGE[1]:g}] x the longest side = "
                    f"[{low:.6g}, {high:.6g}] px of this {width}x{height} image: give it in "
                    "pixels of the image as sent"
                )
        if not (-width <= k[0, 2] <= 2 * width and -height <= k[1, 2] <= 2 * height):
            raise _refuse(
                f"{where}: the principal point (cx, cy) = ({k[0, 2]:.6g}, {k[1, 2]:.6g}) is "
                f"outside [-W, 2W] x [-H, 2H] for this {width}x{height} image: give it in "
                "pixels of the image as sent (near its centre)"
            )
        k[0, 1] = k[1, 0] = 0.0
        k[2] = (0.0, 0.0, 1.0)
    return array


def check_extrinsics(matrices: Sequence) -> np.ndarray:
    """(N, 3, 4) float64 world-to-camera `[R | t]`, one per view: finite as float32,
    `max |RᵀR - I| <= ROTATION_TOLERANCE`, `det R > 0`, `|t| <= MAX_TRANSLATION`; R is replaced
    by the nearest rotation (U Vᵀ of its SVD)."""
    array = np.array(matrices, dtype=np.float64).reshape(-1, 3, 4)
    for index, pose in enumerate(array):
        where = f"extrinsics[{index}]"
        _finite32(pose, where)
        rotation = pose[:, :3]
        error = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
        if error > ROTATION_TOLERANCE:
            raise _refuse(
                f"{where} is not a rigid transform: its 3x3 rotation R has max |RᵀR - I| = "
                f"{error:.3g} > {ROTATION_TOLERANCE:g} (scaled, sheared or not a rotation); send "
                "world-to-camera [R | t] with an orthonormal R"
            )
        if np.linalg.det(rotation) <= 0:
            raise _refuse(
                f"{where}: its rotation R has a negative determinant (a reflection, or a "
                "left-handed frame); send world-to-camera [R | t] with det R = +1"
            )
        if np.abs(pose[:, 3]).max() > MAX_TRANSLATION:
            raise _refuse(
                f"{where}: its translation is beyond {MAX_TRANSLATION:g} in the poses' units: "
                "use units (e.g. meters) that keep the cameras' positions within that"
            )
        u, _, vt = np.linalg.svd(rotation)
        pose[:, :3] = u @ vt
    return array
