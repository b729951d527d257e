"""The fused scene as binary glTF 2.0 (GLB, written by trimesh): one point primitive with
vertex colours and one wireframe frustum per view.

glTF is y-up with the camera looking down -z; the world frame is OpenCV's (y down, z forward),
so every position is diag(1, -1, -1) · X_world, with no re-centring: the GLB overlays the scene
PLY after that one flip. Frustums reach 5 % of the scene's extent in front of each camera.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import trimesh

from da3_serverless.exports.points import ScenePoints, view_pose
from da3_serverless.inference.prediction import Prediction

FRUSTUM_SHARE = 0.05  # frustum depth as a share of the scene's extent
# Apex -> each image corner, then the image rectangle.
FRUSTUM_EDGES = ((0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4), (4, 1))


def scene_glb(points: ScenePoints, prediction: Prediction) -> bytes:
    """The GLB file: `points` (node "points") and a frustum per view ("camera_000", ...)."""
    scene = trimesh.Scene()
    if len(points):
        colors = np.concatenate([points.rgb, np.full((len(points), 1), 255, np.uint8)], axis=1)
        cloud = trimesh.PointCloud(to_gltf(points.xyz), colors=colors)
        scene.add_geometry(cloud, geom_name="points", node_name="points")
    depth = FRUSTUM_SHARE * scene_extent(points)
    for index in range(len(prediction)):
        corners = to_gltf(frustum_corners(prediction, index, depth))
        segments = np.stack([corners[[a, b]] for a, b in FRUSTUM_EDGES])
        name = f"camera_{index:03d}"
        scene.add_geometry(trimesh.load_path(segments), geom_name=name, node_name=name)
    out = BytesIO()
    scene.export(out, file_type="glb")
    return out.getvalue()


def to_gltf(xyz: np.ndarray) -> np.ndarray:
    """(M, 3) OpenCV-axes points as glTF positions: diag(1, -1, -1) · X, float64."""
    return np.asarray(xyz, dtype=np.float64) * (1.0, -1.0, -1.0)


def scene_extent(points: ScenePoints) -> float:
    """The diagonal of the box spanning the points' 2nd to 98th percentiles per axis (1.0 for
    an empty or flat-as-a-point cloud)."""
    if len(points) == 0:
        return 1.0
    low, high = np.percentile(points.xyz, [2.0, 98.0], axis=0)
    extent = float(np.linalg.norm(high - low))
    return extent if np.isfinite(extent) and extent > 0 else 1.0


def frustum_corners(prediction: Prediction, index: int, depth: float) -> np.ndarray:
    """(5, 3) world points: view `index`'s camera centre, then its image corners (top left,
    top right, bottom right, bottom left) at `depth` in front of it."""
    height, width = prediction.depth[index].shape
    pose = view_pose(prediction, index)
    rotation, translation = pose[:, :3], pose[:, 3]
    pixels = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], float)
    rays = pixels @ np.linalg.inv(np.asarray(prediction.intrinsics[index], np.float64)).T
    camera = np.concatenate([np.zeros((1, 3)), depth * rays / rays[:, 2:]])
    return (camera - translation) @ rotation
