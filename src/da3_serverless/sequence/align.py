"""Sim(3) alignment of chunks: a confidence-weighted, outlier-robust similarity fit on the
overlap frames' depth points, and how a fitted Sim(3) moves a chunk's cameras and depth.

The fit uses only the points whose depth ratio (target depth over source depth, the same pixel
seen by both chunks) is within delta of the weighted median ratio: far outliers have a leverage
on the scale (through the source's spread) that Huber weights do not bound, and they drag
least squares and IRLS alike towards a collapsed scale. Then
Umeyama's closed form inside iteratively re-weighted least squares with Huber
weights (delta 0.1, 5 iterations, as DA3-Streaming does), followed by one trimmed refit on the
points whose residual is within delta: Huber alone is bounded but not redescending, so gross
outliers would still bias the answer by about delta times their share. Residuals are relative
(a point's error over its target depth), so delta means the same at every scene scale.
Pure numpy, float64 inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HUBER_DELTA = 0.1
IRLS_ITERATIONS = 5
MIN_POINTS = 16


@dataclass(frozen=True)
class Sim3:
    """x -> scale * rotation @ x + translation."""

    scale: float
    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)

    @staticmethod
    def identity() -> Sim3:
        return Sim3(1.0, np.eye(3), np.zeros(3))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 3) moved by this transform."""
        return self.scale * points @ self.rotation.T + self.translation

    def compose(self, inner: Sim3) -> Sim3:
        """self after inner: x -> self(inner(x))."""
        return Sim3(
            self.scale * inner.scale,
            self.rotation @ inner.rotation,
            self.scale * self.rotation @ inner.translation + self.translation,
        )

    def inverse(self) -> Sim3:
        rotation = self.rotation.T
        return Sim3(1.0 / self.scale, rotation, -(rotation @ self.translation) / self.scale)

    def move_extrinsics(self, extrinsics: np.ndarray) -> np.ndarray:
        """World-to-camera [R|t] (N, 3, 4) of cameras in this transform's source frame, as
        seen in its target frame (camera centres moved, orientations rotated, units scaled)."""
        rotation_w2c = extrinsics[:, :, :3].astype(np.float64)
        centres = -np.einsum("nji,nj->ni", rotation_w2c, extrinsics[:, :, 3])
        new_rotation = rotation_w2c @ self.rotation.T
        new_centres = self.apply(centres)
        new_translation = -np.einsum("nij,nj->ni", new_rotation, new_centres)
        return np.concatenate([new_rotation, new_translation[:, :, None]], axis=2)


@dataclass(frozen=True)
class Fit:
    """A fitted Sim(3) with how well it fits: `residual` is the weighted RMS relative error of
    the points kept, `inliers` their share of the points given."""

    transform: Sim3
    residual: float
    inliers: float
    points: int


def umeyama(source: np.ndarray, target: np.ndarray, weights: np.ndarray) -> Sim3:
    """The weighted least-squares Sim(3) taking `source` (N, 3) onto `target` (N, 3)."""
    weights = weights / weights.sum()
    mean_source = weights @ source
    mean_target = weights @ target
    centred_source = source - mean_source
    centred_target = target - mean_target
    covariance = (centred_target * weights[:, None]).T @ centred_source
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2] = -1.0
    rotation = (u * sign) @ vt
    variance = weights @ np.sum(centred_source**2, axis=1)
    scale = float(singular @ sign / variance)
    return Sim3(scale, rotation, mean_target - scale * rotation @ mean_source)


def robust_sim3(
    source: np.ndarray,
    target: np.ndarray,
    confidence: np.ndarray,
    reference: np.ndarray | None = None,
    source_depth: np.ndarray | None = None,
    delta: float = HUBER_DELTA,
    iterations: int = IRLS_ITERATIONS,
) -> Fit:
    """Fit `target ≈ sim3(source)` over corresponding points (N, 3), weighted by
    `confidence` (N,) and robust to outliers (module docstring). A residual is relative to
    `reference` (N,), the target point's depth in its own camera (default: its distance
    from the target frame's origin). With `source_depth` (N,), the source point's depth in
    its own camera, the fit keeps only the points whose depth ratio agrees with the median
    (module docstring). Raises ValueError when too few usable points remain."""
    if reference is None:
        reference = np.linalg.norm(target, axis=1)
    arrays = [np.asarray(a, np.float64) for a in (source, target, confidence, reference)]
    if source_depth is not None:
        arrays.append(np.asarray(source_depth, np.float64))
    usable = np.isfinite(arrays[0]).all(1) & np.isfinite(arrays[1]).all(1)
    usable &= (arrays[2] > 0) & (arrays[3] > 0) & np.isfinite(arrays[2]) & np.isfinite(arrays[3])
    if usable.sum() < MIN_POINTS:
        raise ValueError(f"only {int(usable.sum())} usable overlap points (need {MIN_POINTS})")
    arrays = [a[usable] for a in arrays]
    if source_depth is not None:
        gate = _ratio_gate(arrays[3], arrays[4], arrays[2], delta)
        arrays = [a[gate] for a in arrays]
    source, target, confidence, reference = arrays[:4]
    reference = _floored(reference)
    transform = umeyama(source, target, confidence)
    for _ in range(iterations):
        relative = _relative_residuals(transform, source, target, reference)
        huber = np.minimum(1.0, delta / np.maximum(relative, 1e-12))
        transform = umeyama(source, target, confidence * huber)
    keep = _relative_residuals(transform, source, target, reference) <= delta
    if keep.sum() >= MIN_POINTS:
        transform = umeyama(source[keep], target[keep], confidence[keep])
    else:
        keep = np.ones_like(keep)
    relative = _relative_residuals(transform, source, target, reference)[keep]
    residual = float(np.sqrt(confidence[keep] @ relative**2 / confidence[keep].sum()))
    return Fit(transform, residual, float(keep.sum() / usable.sum()), int(usable.sum()))


def _ratio_gate(
    target_depth: np.ndarray, source_depth: np.ndarray, confidence: np.ndarray, delta: float
) -> np.ndarray:
    """Which points have a depth ratio within delta (relative) of the confidence-weighted
    median ratio (all of them when fewer than MIN_POINTS would remain)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = target_depth / source_depth
    valid = np.isfinite(ratio) & (ratio > 0)
    if valid.sum() < MIN_POINTS:
        return np.ones(len(confidence), dtype=bool)
    order = np.argsort(ratio[valid])
    cumulative = np.cumsum(confidence[valid][order])
    median = ratio[valid][order][np.searchsorted(cumulative, cumulative[-1] / 2)]
    gate = valid & (np.abs(ratio / median - 1) <= delta)
    return gate if gate.sum() >= MIN_POINTS else np.ones(len(confidence), dtype=bool)


def _floored(reference: np.ndarray) -> np.ndarray:
    """What a residual is divided by, floored at a tenth of its median (points next to the
    camera would otherwise weigh without bound)."""
    return np.maximum(reference, 0.1 * float(np.median(reference)))


def _relative_residuals(
    transform: Sim3, source: np.ndarray, target: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    return np.linalg.norm(transform.apply(source) - target, axis=1) / reference
