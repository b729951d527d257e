"""What a prediction gives back: numpy arrays at each input image's own resolution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5) in the intrinsics' coordinates.
    """

    depth: np.ndarray
    confidence: np.ndarray | None
    sky: np.ndarray | None
    intrinsics: np.ndarray | None
    extrinsics: np.ndarray | None
    is_metric: bool
    units: str  # "m", "relative" or "pose_units"

    def __len__(self) -> int:
        return self.depth.shape[0]
