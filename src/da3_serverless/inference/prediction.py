"""What a prediction gives back: numpy arrays at each input image's own resolution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Gaussians:
    """3D Gaussians, one per pixel of the network's grid (h, w) per view (not resized: each is a
    splat of its own pixel), in the world frame and units of the prediction's depth and
    extrinsics (meters for the nested model, whose Gaussians are scaled like its depth; the
    given poses' frame and units when poses were given).

    means: (N, h, w, 3) float32 centres.
    scales: (N, h, w, 3) float32 standard deviations along the Gaussian's axes.
    rotations: (N, h, w, 4) float32 unit quaternions (w, x, y, z).
    opacities: (N, h, w) float32 in (0, 1).
    colors: (N, h, w, 3) float32 RGB of the view-independent (DC) colour, 0.5 + 0.2821 x DC
        spherical-harmonic coefficient; not clipped to [0, 1].
    sh_rest: (N, h, w, 3, n - 1) float32 spherical-harmonic coefficients of degrees 1 and up
        (n = 9: degrees 1 and 2) per colour channel, in the world frame (the 3DGS basis,
        `model.spherical_harmonics`), or None (degree 0 only).
    """

    means: np.ndarray
    scales: np.ndarray
    rotations: np.ndarray
    opacities: np.ndarray
    colors: np.ndarray
    sh_rest: np.ndarray | None = None

    def __len__(self) -> int:
        return int(np.prod(self.opacities.shape))


@dataclass
class Prediction:
    """Outputs for N views of one scene, each at its input image's own size (H, W).

    depth: (N, H, W) float32 in `units`: meters ("m", `is_metric`), the given extrinsics' units
        ("pose_units") or relative.
    confidence: (N, H, W) float32 or None (models without a confidence output).
    sky: (N, H, W) float32 sky probability in [0, 1], or None.
    intrinsics: (N, 3, 3) float32 pinhole matrices for the input resolution, or None.
    extrinsics: (N, 3, 4) float32 world-to-camera [R|t], or None. The world frame is the first
        view's camera (OpenCV: x right, y down, z forward), or the given extrinsics' frame.
    gaussians: 3D Gaussians (`Gaussians`) when asked for (`predict(..., gaussians=True)`), else
        None.
    scale: where the depth's scale came from (`source`: "model" for the nested model and the
        metric pairs, with `nested_scale`, the factor from the any-view network to metres;
        "focal_length" for DA3METRIC-LARGE, with the `focal_length_px` per view, `focal_from`
        ("focal_length_px", "intrinsics" or "exif") and `canonical_focal_px` 300; "poses" with
        given extrinsics, with `pose_scale`; "none" for relative depth).
    Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5) in the intrinsics' coordinates.
    """

    depth: np.ndarray
    confidence: np.ndarray | None
    sky: np.ndarray | None
    intrinsics: np.ndarray | None
    extrinsics: np.ndarray | None
    is_metric: bool
    units: str  # "m", "relative" or "pose_units"
    gaussians: Gaussians | None = None
    scale: dict | None = None

    def __len__(self) -> int:
        return self.depth.shape[0]
