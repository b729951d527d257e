"""The scene as a COLMAP model in a zip (stored, not deflated), the layout COLMAP, gsplat and
nerfstudio's COLMAP loader open directly:

    images/view_000.jpg, ...     the upright decoded input pixels (COLMAP ignores EXIF)
    sparse/0/cameras.bin         one PINHOLE camera per view at input resolution
    sparse/0/images.bin          each view's world-to-camera pose and its observations
    sparse/0/points3D.bin        the fused points, each with a one-element track
    sparse/0/*.txt               the same in COLMAP's text format, on request

Cameras and poses are exactly the prediction's; a point's observation is its source pixel's
centre, (j + 0.5, i + 0.5) in COLMAP's convention (the top-left pixel's centre is (0.5, 0.5)).
Written with numpy structured arrays: no Python loop over points.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from io import BytesIO

import numpy as np
from PIL import Image

from da3_serverless.exports.points import ScenePoints, view_pose
from da3_serverless.inference.prediction import Prediction

PINHOLE = 1  # COLMAP's camera model id
JPEG_QUALITY = 95
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same scene gives the same bytes
POINT2D = np.dtype([("xy", "<f8", 2), ("point3d_id", "<i8")])
POINT3D = np.dtype(
    [("id", "<u8"), ("xyz", "<f8", 3), ("rgb", "u1", 3), ("error", "<f8"),
     ("track_length", "<u8"), ("image_id", "<i4"), ("point2d_idx", "<i4")]
)  # fmt: skip


def image_name(index: int) -> str:
    return f"view_{index:03d}.jpg"


def colmap_zip(
    points: ScenePoints, prediction: Prediction, images: Sequence[np.ndarray], text: bool = False
) -> bytes:
    """The zip file; `images` are the upright (H, W, 3) uint8 inputs; `text` adds the .txt
    versions of the model. Raises ValueError for intrinsics with skew (not PINHOLE)."""
    cameras = _cameras(prediction)
    quaternions = rotation_to_quaternion(
        np.stack([view_pose(prediction, i)[:, :3] for i in range(len(prediction))])
    )
    starts = np.searchsorted(points.view, np.arange(len(prediction) + 1))
    files = {
        "sparse/0/cameras.bin": _cameras_bin(cameras),
        "sparse/0/images.bin": _images_bin(prediction, points, quaternions, starts),
        "sparse/0/points3D.bin": _points3d_bin(points, starts),
    }
    if text:
        files["sparse/0/cameras.txt"] = _cameras_txt(cameras)
        files["sparse/0/images.txt"] = _images_txt(prediction, points, quaternions, starts)
        files["sparse/0/points3D.txt"] = _points3d_txt(points, starts)
    for index, pixels in enumerate(images):
        jpeg = BytesIO()
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(jpeg, "JPEG", quality=JPEG_QUALITY)
        files[f"images/{image_name(index)}"] = jpeg.getvalue()
    out = BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return out.getvalue()


def _cameras(prediction: Prediction) -> np.ndarray:
    """(N, 6) float64 rows: width, height, fx, fy, cx, cy."""
    rows = []
    for index in range(len(prediction)):
        k = np.asarray(prediction.intrinsics[index], dtype=np.float64)
        if k[0, 1] != 0:
            raise ValueError("intrinsics with skew (K[0][1] != 0) are not a PINHOLE camera")
        height, width = prediction.depth[index].shape
        rows.append([width, height, k[0, 0], k[1, 1], k[0, 2], k[1, 2]])
    return np.array(rows, dtype=np.float64)


def rotation_to_quaternion(rotations: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotation matrices -> (N, 4) unit quaternions (w, x, y, z), Hamilton, w >= 0:
    the eigenvector of the largest eigenvalue of Bar-Itzhack's symmetric 4x4 matrix, which is
    also the nearest rotation's for a matrix that is not exactly orthonormal."""
    r = np.asarray(rotations, dtype=np.float64)
    xx, xy, xz = r[:, 0, 0], r[:, 0, 1], r[:, 0, 2]
    yx, yy, yz = r[:, 1, 0], r[:, 1, 1], r[:, 1, 2]
    zx, zy, zz = r[:, 2, 0], r[:, 2, 1], r[:, 2, 2]
    k = (
        np.stack(
            [
                np.stack([xx - yy - zz, yx + xy, zx + xz, zy - yz], axis=-1),
                np.stack([yx + xy, yy - xx - zz, zy + yz, xz - zx], axis=-1),
                np.stack([zx + xz, zy + yz, zz - xx - yy, yx - xy], axis=-1),
                np.stack([zy - yz, xz - zx, yx - xy, xx + yy + zz], axis=-1),
            ],
            axis=-2,
        )
        / 3.0
    )
    _, vectors = np.linalg.eigh(k)
    xyzw = vectors[:, :, -1]
    wxyz = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    return wxyz * np.where(wxyz[:, :1] < 0, -1.0, 1.0)


def _cameras_bin(cameras: np.ndarray) -> bytes:
    parts = [struct.pack("<Q", len(cameras))]
    for index, (width, height, *params) in enumerate(cameras):
        parts.append(struct.pack("<iiQQ4d", index + 1, PINHOLE, int(width), int(height), *params))
    return b"".join(parts)


def _observations(points: ScenePoints, start: int, stop: int) -> np.ndarray:
    """The POINT2D records of one image: its points' pixel centres and 1-based point ids."""
    records = np.empty(stop - start, dtype=POINT2D)
    records["xy"][:, 0] = points.col[start:stop] + 0.5
    records["xy"][:, 1] = points.row[start:stop] + 0.5
    records["point3d_id"] = np.arange(start + 1, stop + 1)
    return records


def _images_bin(
    prediction: Prediction, points: ScenePoints, quaternions: np.ndarray, starts: np.ndarray
) -> bytes:
    parts = [struct.pack("<Q", len(prediction))]
    for index in range(len(prediction)):
        translation = view_pose(prediction, index)[:, 3]
        parts.append(struct.pack("<i7di", index + 1, *quaternions[index], *translation, index + 1))
        parts.append(image_name(index).encode("ascii") + b"\0")
        parts.append(struct.pack("<Q", starts[index + 1] - starts[index]))
        parts.append(_observations(points, starts[index], starts[index + 1]).tobytes())
    return b"".join(parts)


def _points3d(points: ScenePoints, starts: np.ndarray) -> np.ndarray:
    records = np.zeros(len(points), dtype=POINT3D)
    records["id"] = np.arange(1, len(points) + 1)
    records["xyz"] = points.xyz
    records["rgb"] = points.rgb
    records["track_length"] = 1
    records["image_id"] = points.view + 1
    records["point2d_idx"] = np.arange(len(points)) - starts[points.view]
    return records


def _points3d_bin(points: ScenePoints, starts: np.ndarray) -> bytes:
    return struct.pack("<Q", len(points)) + _points3d(points, starts).tobytes()


# ---- text format: one %-format over all values at once ----------------------------------------


def _lines(row_format: str, values: np.ndarray) -> str:
    """`row_format` applied to each row of the 2-D `values` (one C-level formatting call)."""
    if len(values) == 0:
        return ""
    return (row_format * len(values)) % tuple(values.ravel().tolist())


def _cameras_txt(cameras: np.ndarray) -> bytes:
    header = (
        "# Camera list with one line of data per camera:\n"
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n"
        f"# Number of cameras: {len(cameras)}\n"
    )
    ids = np.arange(1, len(cameras) + 1, dtype=np.float64)[:, None]
    body = _lines("%d PINHOLE %d %d %.17g %.17g %.17g %.17g\n", np.hstack([ids, cameras]))
    return (header + body).encode("ascii")


def _images_txt(
    prediction: Prediction, points: ScenePoints, quaternions: np.ndarray, starts: np.ndarray
) -> bytes:
    mean = len(points) / max(len(prediction), 1)
    parts = [
        "# Image list with two lines of data per image:\n"
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n"
        "#   POINTS2D[] as (X, Y, POINT3D_ID)\n"
        f"# Number of images: {len(prediction)}, mean observations per image: {mean:.17g}\n"
    ]
    for index in range(len(prediction)):
        pose = np.concatenate([quaternions[index], view_pose(prediction, index)[:, 3]])
        line = f"{index + 1} " + _lines("%.17g " * 7, pose[None])
        parts.append(f"{line}{index + 1} {image_name(index)}\n")
        records = _observations(points, starts[index], starts[index + 1])
        table = np.column_stack([records["xy"], records["point3d_id"].astype(np.float64)])
        parts.append(_lines("%.17g %.17g %d ", table).rstrip(" ") + "\n")
    return "".join(parts).encode("ascii")


def _points3d_txt(points: ScenePoints, starts: np.ndarray) -> bytes:
    header = (
        "# 3D point list with one line of data per point:\n"
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
        f"# Number of points: {len(points)}, mean track length: 1\n"
    )
    records = _points3d(points, starts)
    table = np.column_stack(
        [records["id"], records["xyz"], records["rgb"], records["error"], records["image_id"],
         records["point2d_idx"]]
    ).astype(np.float64)  # fmt: skip
    return (header + _lines("%d %.17g %.17g %.17g %d %d %d %.17g %d %d\n", table)).encode("ascii")
