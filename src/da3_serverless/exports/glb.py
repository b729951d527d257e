"""The fused scene as binary glTF 2.0 (GLB): one point primitive with vertex colours and one
wireframe frustum per view (written by trimesh), and one glTF perspective camera per view (added
to trimesh's JSON chunk here: trimesh writes at most one camera).

glTF is y-up with the camera looking down -z; the world frame is OpenCV's (y down, z forward),
so every position is diag(1, -1, -1) · X_world, with no re-centring: the GLB overlays the scene
PLY after that one flip. Frustums reach 5 % of the scene's extent in front of each camera. A
view's camera node is its camera-to-world pose in that flipped frame (an OpenCV camera's axes
flipped the same way are glTF's camera axes); its camera has the vertical field of view and the
aspect ratio of the intrinsics, which glTF cannot carry exactly (a principal point off the
image centre), so the camera's `extras` carry them: `intrinsics` (3x3, pixels, OpenCV's
convention), `width`, `height` and `view`.
"""

from __future__ import annotations

import json
import struct
from io import BytesIO

import numpy as np
import trimesh

from da3_serverless.exports.colmap import rotation_to_quaternion
from da3_serverless.exports.points import ScenePoints, view_pose
from da3_serverless.inference.prediction import Prediction

FRUSTUM_SHARE = 0.05  # frustum depth as a share of the scene's extent
# Apex -> each image corner, then the image rectangle.
FRUSTUM_EDGES = ((0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4), (4, 1))
NEAR_SHARE = 0.01  # a camera's znear as a share of the frustum depth
FLIP = np.diag([1.0, -1.0, -1.0])  # OpenCV axes -> glTF axes
GLB_MAGIC, GLB_JSON, GLB_BIN = b"glTF", b"JSON", b"BIN\x00"


def scene_glb(points: ScenePoints, prediction: Prediction) -> bytes:
    """The GLB file: `points` (node "points"), a frustum per view ("camera_000", ...) and a
    glTF camera per view (camera and node "view_000", ...)."""
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
    near = NEAR_SHARE * depth
    cameras = [gltf_camera(prediction, index, near) for index in range(len(prediction))]
    return with_cameras(out.getvalue(), cameras)


def gltf_camera(prediction: Prediction, index: int, near: float) -> tuple[dict, dict]:
    """View `index` as a glTF perspective camera and the node that places it."""
    height, width = prediction.depth[index].shape
    k = np.asarray(prediction.intrinsics[index], dtype=np.float64)
    name = f"view_{index:03d}"
    camera = {
        "name": name,
        "type": "perspective",
        "perspective": {
            "yfov": float(2 * np.arctan(height / (2 * k[1, 1]))),
            "aspectRatio": float((width / k[0, 0]) / (height / k[1, 1])),
            "znear": float(near),
        },
        "extras": {"intrinsics": k.tolist(), "width": width, "height": height, "view": index},
    }
    pose = view_pose(prediction, index)
    rotation, translation = pose[:, :3], pose[:, 3]
    to_world = FLIP @ rotation.T @ FLIP  # camera -> world, both in glTF axes
    w, x, y, z = rotation_to_quaternion(to_world[None])[0]
    node = {
        "name": name,
        "camera": index,
        "rotation": [float(x), float(y), float(z), float(w)],
        "translation": (FLIP @ (-rotation.T @ translation)).tolist(),
    }
    return camera, node


def with_cameras(glb: bytes, cameras: list[tuple[dict, dict]]) -> bytes:
    """`glb` with `cameras` (each a camera and its node) added to its JSON chunk and its
    scene's root nodes; the binary chunk is kept as it is."""
    magic, version, _ = struct.unpack_from("<4sII", glb)
    length, kind = struct.unpack_from("<I4s", glb, 12)
    if magic != GLB_MAGIC or kind != GLB_JSON:
        raise ValueError("not a GLB file starting with its JSON chunk")
    document = json.loads(glb[20 : 20 + length])
    nodes = document.setdefault("nodes", [])
    roots = document["scenes"][document.get("scene", 0)].setdefault("nodes", [])
    document.setdefault("cameras", [])
    for camera, node in cameras:
        node["camera"] = len(document["cameras"])
        document["cameras"].append(camera)
        roots.append(len(nodes))
        nodes.append(node)
    text = json.dumps(document, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    rest = glb[20 + length :]
    total = 12 + 8 + len(text) + len(rest)
    return (
        struct.pack("<4sII", GLB_MAGIC, version, total)
        + struct.pack("<I4s", len(text), GLB_JSON)
        + text
        + rest
    )


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
