"""Robust fits of a prediction's scale to known depths (anchors), and applying one.

Pure numpy. Observations are pairs (predicted, known) with a weight each (the prediction's
confidence there). Two models (docs/ARCHITECTURE.md §9):

- `fit_scale`: one scale s with known = s x predicted. Fitted on log ratios, so a 10 % error
  weighs the same at 1 m and at 50 m: a weighted median to start, then iteratively reweighted
  least squares with a Huber loss, then observations further than `OUTLIER_LOG` from the fit
  are outliers and the scale is refitted on the inliers alone.
- `fit_inverse_affine`: scale and shift in inverse depth, 1/known = a / predicted + b, for the
  monocular relative model (one view, no cameras to keep consistent). The same steps on the
  relative residual of the inverse depth, starting from the scale-only fit.

`apply_scale` multiplies everything metric in a `Prediction` by s (depth, camera translations,
Gaussian centres and sizes), so the multi-view geometry stays consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from da3_serverless.inference.prediction import Prediction

HUBER_DELTA = 0.05  # in log ratio (or relative inverse depth): about 5 %
OUTLIER_LOG = 0.2  # an observation more than ~22 % off the fit is an outlier
MIN_INLIER_SHARE = 0.5  # of the weight: fewer inliers than this and the anchors are refused
IRLS_ITERATIONS = 10


@dataclass
class Fit:
    """A fitted model and which observations it kept. `shift` is None for a scale-only fit."""

    scale: float
    shift: float | None
    inliers: np.ndarray  # bool per observation
    inlier_share: float  # of the weight

    def predict(self, predicted: np.ndarray) -> np.ndarray:
        """The fitted depth for predicted depths."""
        if self.shift is None:
            return self.scale * predicted
        return 1.0 / (self.scale / predicted + self.shift)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def _huber_weights(residuals: np.ndarray, delta: float) -> np.ndarray:
    size = np.abs(residuals)
    return np.where(size <= delta, 1.0, delta / np.maximum(size, 1e-30))


def _check(predicted: np.ndarray, known: np.ndarray, weights: np.ndarray) -> None:
    if not (predicted.shape == known.shape == weights.shape) or predicted.ndim != 1:
        raise ValueError("predicted, known and weights must be 1-d arrays of one length")
    if predicted.size == 0:
        raise ValueError("no observations to fit")
    if not (np.all(predicted > 0) and np.all(known > 0) and np.all(weights > 0)):
        raise ValueError("depths and weights must be positive")


def fit_scale(predicted: np.ndarray, known: np.ndarray, weights: np.ndarray) -> Fit:
    """Robust, weighted fit of known = s x predicted (see the module's docstring)."""
    predicted, known, weights = (np.asarray(a, np.float64) for a in (predicted, known, weights))
    _check(predicted, known, weights)
    ratios = np.log(known) - np.log(predicted)
    log_s = _weighted_median(ratios, weights)
    for _ in range(IRLS_ITERATIONS):
        w = weights * _huber_weights(ratios - log_s, HUBER_DELTA)
        log_s = float(np.sum(w * ratios) / np.sum(w))
    inliers = np.abs(ratios - log_s) <= OUTLIER_LOG
    if inliers.any():
        log_s = float(np.sum(weights[inliers] * ratios[inliers]) / np.sum(weights[inliers]))
        inliers = np.abs(ratios - log_s) <= OUTLIER_LOG
    share = float(weights[inliers].sum() / weights.sum())
    return Fit(float(np.exp(log_s)), None, inliers, share)


def _solve_affine(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted least squares of y = a x + b (falls back to b = 0 when x does not vary)."""
    design = np.stack([x, np.ones_like(x)], axis=1) * np.sqrt(w)[:, None]
    target = y * np.sqrt(w)
    if np.ptp(x) <= 1e-12 * max(float(np.abs(x).max()), 1e-30):
        return float(np.sum(w * x * y) / np.sum(w * x * x)), 0.0
    (a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(a), float(b)


def fit_inverse_affine(predicted: np.ndarray, known: np.ndarray, weights: np.ndarray) -> Fit:
    """Robust, weighted fit of 1/known = a / predicted + b (see the module's docstring)."""
    predicted, known, weights = (np.asarray(a, np.float64) for a in (predicted, known, weights))
    _check(predicted, known, weights)
    x, y = 1.0 / predicted, 1.0 / known
    start = fit_scale(predicted, known, weights)
    a, b = 1.0 / start.scale, 0.0
    for _ in range(IRLS_ITERATIONS):
        relative = (a * x + b - y) / y
        a, b = _solve_affine(x, y, weights * _huber_weights(relative, HUBER_DELTA) / y**2)
    inliers = np.abs((a * x + b - y) / y) <= OUTLIER_LOG
    if inliers.sum() >= 2:
        a, b = _solve_affine(x[inliers], y[inliers], weights[inliers] / y[inliers] ** 2)
        inliers = np.abs((a * x + b - y) / y) <= OUTLIER_LOG
    share = float(weights[inliers].sum() / weights.sum())
    return Fit(a, b, inliers, share)


def apply_scale(prediction: Prediction, scale: float) -> Prediction:
    """The prediction with every length multiplied by `scale`: depth, the cameras' translations
    and the Gaussians' centres and sizes (rotations, colours and opacities are unitless)."""
    extrinsics = prediction.extrinsics
    if extrinsics is not None:
        extrinsics = extrinsics.copy()
        extrinsics[:, :, 3] *= np.float32(scale)
    gaussians = prediction.gaussians
    if gaussians is not None:
        gaussians = replace(
            gaussians,
            means=gaussians.means * np.float32(scale),
            scales=gaussians.scales * np.float32(scale),
        )
    depth = (prediction.depth * np.float32(scale)).astype(np.float32)
    return replace(prediction, depth=depth, extrinsics=extrinsics, gaussians=gaussians)


def apply_inverse_affine(prediction: Prediction, scale: float, shift: float) -> Prediction:
    """The prediction's depth d mapped to 1 / (scale / d + shift) (monocular relative models,
    which have no cameras or Gaussians); pixels that would map to a non-positive inverse depth
    (beyond the fitted range, e.g. sky) get the largest finite fitted depth."""
    inverse = scale / np.maximum(prediction.depth.astype(np.float64), 1e-12) + shift
    valid = inverse > 0
    depth = np.where(valid, 1.0 / np.where(valid, inverse, 1.0), 0.0)
    far = float(depth[valid].max()) if valid.any() else 1.0
    depth = np.where(valid, depth, far).astype(np.float32)
    return replace(prediction, depth=depth)
