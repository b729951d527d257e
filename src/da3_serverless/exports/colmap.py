"""The scene as a COLMAP model in a zip (stored, not deflated), the layout COLMAP, gsplat and
nerfstudio's COLMAP loader open (see the README for their commands):

    images/view_000.png, ...     the upright decoded input pixels, lossless (COLMAP ignores
                                 EXIF); or view_000.jpg, ... (JPEG 4:4:4, quality 95) on request
    sparse/0/cameras.bin         one PINHOLE camera per view at input resolution
    sparse/0/images.bin          each view's world-to-camera pose and its observations
    sparse/0/points3D.bin        the fused points with their tracks
    sparse/0/*.txt               the same in COLMAP's text format, on request

Cameras and poses are exactly the prediction's. A point's first observation is its source
pixel's centre, (j + 0.5, i + 0.5) in COLMAP's convention (the top-left pixel's centre is (0.5,
0.5)); where the voxel grid merged pixels of other views into the point (`ScenePoints.merged`),
each of those views observes it too, at that pixel's centre. A point's stored error is the mean
reprojection error of its track, in pixels. Written with numpy arrays: no Python loop over
points (but in the optional text of points3D.txt).
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

import numpy as np
from PIL import Image

from da3_serverless.exports.points import ScenePoints, view_pose
from da3_serverless.inference.prediction import Prediction

PINHOLE = 1  # COLMAP's camera model id
JPEG_QUALITY = 95
# zlib level 1: a 1208 x 680 photo in 0.45 s and 970 kB, against 1.8 s and 890 kB at Pillow's
# default 6 (measured on the test photos, 2 busy CPU cores).
PNG_LEVEL = 1
IMAGE_FORMATS = ("png", "jpg")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same scene gives the same bytes
POINT2D = np.dtype([("xy", "<f8", 2), ("point3d_id", "<i8")])
POINT3D_HEAD = np.dtype(
    [("id", "<u8"), ("xyz", "<f8", 3), ("rgb", "u1", 3), ("error", "<f8"),
     ("track_length", "<u8")]
)  # fmt: skip
TRACK_ELEMENT = np.dtype([("image_id", "<i4"), ("point2d_idx", "<i4")])


def image_name(index: int, image_format: str = "png") -> str:
    return f"view_{index:03d}.{image_format}"


@dataclass
class Tracks:
    """Every observation of the model, T of them, ordered by image and within an image by
    point2D index (the point's own pixels first, then merged ones): `point` (T,) index into
    the points, `image` (T,) view index, `xy` (T, 2) the pixel centre, `index` (T,) its
    point2D index in its image; `starts` (N + 1,) where each image's observations begin;
    `by_point` the observation order grouped by point (its own pixel first, then by view), and
    `error` (M,) each point's mean reprojection error."""

    point: np.ndarray
    image: np.ndarray
    xy: np.ndarray
    index: np.ndarray
    starts: np.ndarray
    by_point: np.ndarray
    error: np.ndarray


def colmap_zip(
    points: ScenePoints,
    prediction: Prediction,
    images: Sequence[np.ndarray],
    text: bool = False,
    image_format: str = "png",
) -> bytes:
    """The zip file; `images` are the upright (H, W, 3) uint8 inputs; `text` adds the .txt
    versions of the model; `image_format` "png" (lossless) or "jpg" (JPEG 4:4:4). Raises
    ValueError for intrinsics with skew (not PINHOLE) or another image format."""
    out = BytesIO()
    write_colmap_zip(out, points, prediction, images, text, image_format)
    return out.getvalue()


def write_colmap_zip(
    out: BinaryIO,
    points: ScenePoints,
    prediction: Prediction,
    images: Sequence[np.ndarray],
    text: bool = False,
    image_format: str = "png",
) -> None:
    """`colmap_zip` written into `out` (a file, for a sequence's many frames): each image is
    encoded as it is written, so only one is in memory at a time."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    cameras = _cameras(prediction)
    quaternions = rotation_to_quaternion(
        np.stack([view_pose(prediction, i)[:, :3] for i in range(len(prediction))])
    )
    tracks = build_tracks(points, prediction, quaternions)
    names = [image_name(index, image_format) for index in range(len(prediction))]
    files = {
        "sparse/0/cameras.bin": _cameras_bin(cameras),
        "sparse/0/images.bin": _images_bin(prediction, names, quaternions, tracks),
        "sparse/0/points3D.bin": _points3d_bin(points, tracks),
    }
    if text:
        files["sparse/0/cameras.txt"] = _cameras_txt(cameras)
        files["sparse/0/images.txt"] = _images_txt(prediction, names, quaternions, tracks)
        files["sparse/0/points3D.txt"] = _points3d_txt(points, tracks)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            _add(archive, name, data)
        for name, pixels in zip(names, images, strict=True):
            _add(archive, f"images/{name}", _encode_image(pixels, image_format))


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def _encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """PNG, or JPEG at JPEG_QUALITY without chroma subsampling (4:4:4)."""
    out = BytesIO()
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    if image_format == "png":
        image.save(out, "PNG", compress_level=PNG_LEVEL)
    else:
        image.save(out, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def build_tracks(points: ScenePoints, prediction: Prediction, quaternions: np.ndarray) -> Tracks:
    """The observations of `points`: each point's own pixel, and the merged pixels of other
    views (`points.merged`), with each point's mean reprojection error through the poses as
    written (`quaternions` (N, 4) w, x, y, z, and the translations)."""
    merged = points.merged
    point = np.arange(len(points), dtype=np.int64)
    image, rows, cols = points.view, points.row, points.col
    if merged is not None and len(merged):
        front = _in_front(prediction, points.xyz[merged.point], merged.view)
        point = np.concatenate([point, merged.point[front]])
        image = np.concatenate([image, merged.view[front]])
        rows = np.concatenate([rows, merged.row[front]])
        cols = np.concatenate([cols, merged.col[front]])
    order = np.argsort(image, kind="stable")  # by image; own pixels first, as they come
    point, image = point[order], image[order].astype(np.int64)
    merged_pixel = order >= len(points)
    xy = np.stack([cols[order], rows[order]], axis=1).astype(np.float64) + 0.5
    starts = np.searchsorted(image, np.arange(len(prediction) + 1))
    index = np.arange(len(point)) - starts[image]
    by_point = np.lexsort((image, merged_pixel, point))  # a point's own pixel first
    residual = np.zeros(len(point))
    for view in range(len(prediction)):
        mine = slice(starts[view], starts[view + 1])
        residual[mine] = _reprojection_errors(
            prediction, view, quaternions[view], points.xyz[point[mine]], xy[mine]
        )
    counts = np.bincount(point, minlength=len(points))
    error = np.bincount(point, weights=residual, minlength=len(points)) / np.maximum(counts, 1)
    return Tracks(point, image, xy, index, starts, by_point, error)


def _in_front(prediction: Prediction, xyz: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Whether each point is in front of the camera of its view (a merged observation of a
    point behind it, possible only with voxels as large as the depth, is left out)."""
    front = np.zeros(len(xyz), dtype=bool)
    for view in np.unique(views).tolist():
        mine = views == view
        pose = view_pose(prediction, view)
        front[mine] = np.asarray(xyz[mine], np.float64) @ pose[2, :3] + pose[2, 3] > 0
    return front


def _reprojection_errors(
    prediction: Prediction, view: int, quaternion: np.ndarray, xyz: np.ndarray, xy: np.ndarray
) -> np.ndarray:
    """Pixel distances between `xyz` (world) projected into `view` and `xy`, with the view's
    rotation as its written `quaternion`, as COLMAP computes them."""
    rotation = quaternion_to_rotation(quaternion)
    translation = view_pose(prediction, view)[:, 3]
    camera = np.asarray(xyz, dtype=np.float64) @ rotation.T + translation
    pixels = camera @ np.asarray(prediction.intrinsics[view], dtype=np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        projected = pixels[:, :2] / pixels[:, 2:]
    return np.linalg.norm(projected - xy, axis=1)


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


def quaternion_to_rotation(quaternion: np.ndarray) -> np.ndarray:
    """A unit quaternion (w, x, y, z) -> its (3, 3) rotation matrix (normalised first)."""
    w, x, y, z = np.asarray(quaternion, dtype=np.float64) / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _cameras_bin(cameras: np.ndarray) -> bytes:
    parts = [struct.pack("<Q", len(cameras))]
    for index, (width, height, *params) in enumerate(cameras):
        parts.append(struct.pack("<iiQQ4d", index + 1, PINHOLE, int(width), int(height), *params))
    return b"".join(parts)


def _observations(tracks: Tracks, view: int) -> np.ndarray:
    """The POINT2D records of one image: its observations' pixel centres and 1-based point
    ids."""
    mine = slice(tracks.starts[view], tracks.starts[view + 1])
    records = np.empty(mine.stop - mine.start, dtype=POINT2D)
    records["xy"] = tracks.xy[mine]
    records["point3d_id"] = tracks.point[mine] + 1
    return records


def _images_bin(
    prediction: Prediction, names: list[str], quaternions: np.ndarray, tracks: Tracks
) -> bytes:
    parts = [struct.pack("<Q", len(prediction))]
    for index in range(len(prediction)):
        translation = view_pose(prediction, index)[:, 3]
        parts.append(struct.pack("<i7di", index + 1, *quaternions[index], *translation, index + 1))
        parts.append(names[index].encode("ascii") + b"\0")
        records = _observations(tracks, index)
        parts.append(struct.pack("<Q", len(records)) + records.tobytes())
    return b"".join(parts)


def _point_heads(points: ScenePoints, tracks: Tracks) -> np.ndarray:
    heads = np.zeros(len(points), dtype=POINT3D_HEAD)
    heads["id"] = np.arange(1, len(points) + 1)
    heads["xyz"] = points.xyz
    heads["rgb"] = points.rgb
    heads["error"] = tracks.error
    heads["track_length"] = np.bincount(tracks.point, minlength=len(points))
    return heads


def _track_elements(tracks: Tracks) -> np.ndarray:
    """Every track element, grouped by point (in point order)."""
    elements = np.empty(len(tracks.point), dtype=TRACK_ELEMENT)
    elements["image_id"] = tracks.image[tracks.by_point] + 1
    elements["point2d_idx"] = tracks.index[tracks.by_point]
    return elements


def _point_groups(points: ScenePoints, tracks: Tracks):
    """The points' records grouped by track length (ascending), each group in id order: a
    structured array of the fixed head and that many track elements (COLMAP reads points in any
    order)."""
    heads = _point_heads(points, tracks)
    elements = _track_elements(tracks)
    lengths = heads["track_length"].astype(np.int64)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for length in np.unique(lengths).tolist():
        ids = np.flatnonzero(lengths == length)
        dtype = np.dtype([("head", POINT3D_HEAD), ("track", TRACK_ELEMENT, (length,))])
        records = np.empty(len(ids), dtype=dtype)
        records["head"] = heads[ids]
        records["track"] = elements[first[ids][:, None] + np.arange(length)]
        yield records


def _points3d_bin(points: ScenePoints, tracks: Tracks) -> bytes:
    groups = [records.tobytes() for records in _point_groups(points, tracks)]
    return struct.pack("<Q", len(points)) + b"".join(groups)


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
    prediction: Prediction, names: list[str], quaternions: np.ndarray, tracks: Tracks
) -> bytes:
    mean = len(tracks.point) / max(len(prediction), 1)
    parts = [
        "# Image list with two lines of data per image:\n"
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n"
        "#   POINTS2D[] as (X, Y, POINT3D_ID)\n"
        f"# Number of images: {len(prediction)}, mean observations per image: {mean:.17g}\n"
    ]
    for index in range(len(prediction)):
        pose = np.concatenate([quaternions[index], view_pose(prediction, index)[:, 3]])
        line = f"{index + 1} " + _lines("%.17g " * 7, pose[None])
        parts.append(f"{line}{index + 1} {names[index]}\n")
        records = _observations(tracks, index)
        table = np.column_stack([records["xy"], records["point3d_id"].astype(np.float64)])
        parts.append(_lines("%.17g %.17g %d ", table).rstrip(" ") + "\n")
    return "".join(parts).encode("ascii")


def _points3d_txt(points: ScenePoints, tracks: Tracks) -> bytes:
    mean = len(tracks.point) / max(len(points), 1)
    parts = [
        "# 3D point list with one line of data per point:\n"
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
        f"# Number of points: {len(points)}, mean track length: {mean:.17g}\n"
    ]
    for records in _point_groups(points, tracks):
        head, track = records["head"], records["track"]
        length = track.shape[1]
        table = np.column_stack(
            [head["id"], head["xyz"], head["rgb"], head["error"],
             np.stack([track["image_id"], track["point2d_idx"]], axis=2).reshape(len(head), -1)]
        ).astype(np.float64)  # fmt: skip
        row = "%d %.17g %.17g %.17g %d %d %d %.17g" + " %d %d" * length + "\n"
        parts.append(_lines(row, table))
    return "".join(parts).encode("ascii")
