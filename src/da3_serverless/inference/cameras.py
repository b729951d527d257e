"""Camera helpers for pose-conditioned input: validation, normalisation and Sim(3) alignment."""

from __future__ import annotations

import numpy as np


def as_matrices(value: object, shape: tuple[int, int], count: int, name: str) -> np.ndarray:
    """A (count, *shape) float64 array from a single matrix or one per view.

    Raises ValueError saying what was expected when the shape or count is off.
    """
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric {shape[0]}x{shape[1]} matrices") from None
    if array.shape == shape:
        array = np.broadcast_to(array, (count, *shape)).copy()
    if array.ndim != 3 or array.shape[1:] != shape:
        raise ValueError(
            f"{name} has shape {array.shape}; expected ({count}, {shape[0]}, {shape[1]}): "
            f"one {shape[0]}x{shape[1]} matrix per view"
        )
    if array.shape[0] != count:
        raise ValueError(
            f"{name} has {array.shape[0]} matrices for {count} views: give one per view"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def extrinsics_4x4(extrinsics: np.ndarray) -> np.ndarray:
    """(N, 3, 4) or (N, 4, 4) world-to-camera -> (N, 4, 4)."""
    if extrinsics.shape[1:] == (4, 4):
        return extrinsics.copy()
    full = np.tile(np.eye(4), (extrinsics.shape[0], 1, 1))
    full[:, :3, :] = extrinsics
    return full


def normalise_extrinsics(extrinsics: np.ndarray) -> np.ndarray:
    """(N, 4, 4) world-to-camera -> the same cameras in the first camera's frame, with the
    median camera distance scaled to 1 (at least 0.1 before scaling): the frame the network's
    camera encoder was trained in. The median is the lower middle value for an even count, as
    `torch.median` takes it (for two views: the first camera's distance, 0, hence 0.1)."""
    relative = extrinsics @ np.linalg.inv(extrinsics[0])
    distances = np.sort(np.linalg.norm(np.linalg.inv(relative)[:, :3, 3], axis=1))
    scale = max(float(distances[(len(distances) - 1) // 2]), 0.1)
    relative[:, :3, 3] /= scale
    return relative


def relative_to_first_view(extrinsics: np.ndarray) -> np.ndarray:
    """(N, 3, 4) world-to-camera -> the same cameras with the first view's camera frame as the
    world frame (view 0 becomes exactly [I | 0]); a rigid change of frame, so the depth maps and
    the cameras' relative poses stay as they were. (N, 3, 4) float32."""
    full = extrinsics_4x4(np.asarray(extrinsics, dtype=np.float64))
    relative = full @ np.linalg.inv(full[0])
    relative[0] = np.eye(4)
    return relative[:, :3].astype(np.float32)


def camera_centers(extrinsics: np.ndarray) -> np.ndarray:
    """(N, 3 or 4, 4) world-to-camera -> (N, 3) camera centres in world coordinates."""
    rotation, translation = extrinsics[:, :3, :3], extrinsics[:, :3, 3]
    return -np.einsum("nji,nj->ni", rotation, translation)


def umeyama_scale(target: np.ndarray, source: np.ndarray) -> float:
    """Scale s of the least-squares similarity target ≈ s R source + t between (N, 3) point
    sets (Umeyama 1991). Fewer than two distinct points carry no scale: returns 1."""
    if len(source) < 2:
        return 1.0
    source_centered = source - source.mean(axis=0)
    target_centered = target - target.mean(axis=0)
    variance = (source_centered**2).sum() / len(source)
    if variance < 1e-12:
        return 1.0
    covariance = target_centered.T @ source_centered / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    return float((singular * sign).sum() / variance)
