"""3D Gaussians -> a standard 3D Gaussian Splatting PLY file (bytes).

One binary little-endian `vertex` element with float32 properties x, y, z, f_dc_0..2, opacity,
scale_0..2, rot_0..3: the layout 3DGS viewers read (degree-0 colour only). Values are stored
before the activations those viewers apply, i.e. inverted:

- opacity: logit(opacity), opacities clipped to [1e-6, 1 - 1e-6] first;
- scale_i: log(|scale_i|) (a Gaussian's covariance depends on scale^2), at least log(1e-12);
- rot_0..3: the rotation quaternion (w, x, y, z) normalised ((1, 0, 0, 0) for a zero one);
- f_dc_i: (rgb_i - 0.5) / C0, C0 = 0.28209479 the degree-0 spherical-harmonic constant.

Pure: arrays in, bytes out; no files, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

PROPERTIES = (
    "x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip
# Degree-0 real spherical harmonic, 1 / (2 sqrt(pi)) (`model.spherical_harmonics.SH_C0`; not
# imported, so this writer stays free of torch).
SH_C0 = 0.28209479177387814
_OPACITY_EPS = 1e-6
_MIN_SCALE = 1e-12


class GaussianArrays(Protocol):
    """Anything with these arrays, sharing leading dimensions (..., e.g. views x rows x columns):
    means (..., 3), scales (..., 3) standard deviations, rotations (..., 4) quaternions (w, x, y,
    z), opacities (...) in [0, 1], colors (...,  3) RGB (DC colour, about [0, 1]). Such as
    `inference.prediction.Gaussians`."""

    means: np.ndarray
    scales: np.ndarray
    rotations: np.ndarray
    opacities: np.ndarray
    colors: np.ndarray


def gaussian_columns(gaussians: GaussianArrays, keep: np.ndarray | None = None) -> np.ndarray:
    """The PLY's values as an (M, 14) float32 array in `PROPERTIES` order, activations inverted.

    keep: boolean mask over the leading dimensions, which Gaussians to write (default all).
    Gaussians with any non-finite value are left out. ValueError for mismatched shapes.
    """
    shape = np.shape(gaussians.opacities)
    parts = {"means": 3, "colors": 3, "scales": 3, "rotations": 4}
    for name, width in parts.items():
        if np.shape(getattr(gaussians, name)) != (*shape, width):
            raise ValueError(
                f"gaussians.{name} must have shape {(*shape, width)} to match opacities "
                f"{shape}, got {np.shape(getattr(gaussians, name))}"
            )
    if keep is not None and np.shape(keep) != shape:
        raise ValueError(f"keep must be a boolean mask of shape {shape}, got {np.shape(keep)}")

    def flat(name: str, width: int) -> np.ndarray:
        values = np.asarray(getattr(gaussians, name), dtype=np.float64).reshape(-1, width)
        return values if keep is None else values[np.asarray(keep, dtype=bool).reshape(-1)]

    opacity = np.clip(flat("opacities", 1), _OPACITY_EPS, 1 - _OPACITY_EPS)
    rotations = flat("rotations", 4)
    norm = np.linalg.norm(rotations, axis=1, keepdims=True)
    identity = np.array([1.0, 0.0, 0.0, 0.0])
    rotations = np.where(norm > 0, rotations / np.where(norm > 0, norm, 1.0), identity)
    with np.errstate(divide="ignore", invalid="ignore"):
        columns = np.concatenate(
            [
                flat("means", 3),
                (flat("colors", 3) - 0.5) / SH_C0,
                np.log(opacity / (1 - opacity)),
                np.log(np.maximum(np.abs(flat("scales", 3)), _MIN_SCALE)),
                rotations,
            ],
            axis=1,
        ).astype(np.float32)
    return columns[np.isfinite(columns).all(axis=1)]


def gaussians_ply(
    gaussians: GaussianArrays,
    *,
    keep: np.ndarray | None = None,
    comments: Sequence[str] = (),
) -> bytes:
    """A binary 3DGS PLY of `gaussians` (see the module docstring for the stored values).

    keep: boolean mask over the Gaussians to write (default all; non-finite ones are always left
    out). comments: header comment lines (e.g. "units m"), ASCII without line breaks.
    """
    for comment in comments:
        if not comment.isascii() or "\n" in comment or "\r" in comment:
            raise ValueError(f"PLY comments must be one line of ASCII, got {comment!r}")
    columns = gaussian_columns(gaussians, keep)
    header = ["ply", "format binary_little_endian 1.0"]
    header += [f"comment {comment}" for comment in comments]
    header.append(f"element vertex {len(columns)}")
    header += [f"property float {name}" for name in PROPERTIES]
    header.append("end_header")
    body = columns.astype("<f4", copy=False).tobytes()
    return ("\n".join(header) + "\n").encode("ascii") + body
