"""Scene outputs (scene_ply, scene_glb, colmap) and the float maps (confidence_npy, depth_exr,
depth_mm_png), read back by the programs their users use: pycolmap, trimesh, plyfile, OpenEXR,
OpenCV.

First on synthetic predictions whose geometry is known, then through the real request path
(`Service.handle` with a random-weight da3-small on the test photos, for predicted and for
given cameras), then through the self-hosted server with the client and the CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import OpenEXR
import plyfile
import pycolmap
import pytest
import trimesh
from PIL import Image, JpegImagePlugin

from conftest import SMALL_REPO, TEST_API_KEY, offline_settings
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.outputs import unavailable_outputs
from da3_serverless.api.schema import SCENE_OUTPUTS, RunResponse, parse_request
from da3_serverless.exports.colmap import colmap_zip, rotation_to_quaternion
from da3_serverless.exports.exr import depth_exr
from da3_serverless.exports.glb import scene_glb
from da3_serverless.exports.maps import depth_mm_png
from da3_serverless.exports.ply import scene_ply
from da3_serverless.exports.points import SceneOptions, fuse, voxel_thin
from da3_serverless.inference.catalog import lookup_model
from da3_serverless.inference.prediction import Prediction
from da3_serverless.service import Service
from js_tools import read_glb_in_node, three_js_pixels
from paths import IMAGES

PIXEL_TOLERANCE = 0.05  # px: how far a point may project from its pixel's centre
ERROR_TOLERANCE = 1e-6  # px: a stored COLMAP error against pycolmap's own
RES = 140
PHOTOS = [IMAGES / "soh-000.png", IMAGES / "soh-010.png"]


# ---- synthetic scenes --------------------------------------------------------------------------


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def synthetic(
    views: int = 3, height: int = 48, width: int = 64, seed: int = 0, sky: bool = False
) -> tuple[Prediction, list[np.ndarray]]:
    """A smooth scene seen by `views` cameras (view 0 at the world origin), with confidence,
    optionally sky, and random colours."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    depth = np.stack(
        [2 + 0.3 * np.sin(cols / 9 + v) + 0.2 * np.cos(rows / 7) for v in range(views)]
    ).astype(np.float32)
    intrinsics = np.stack(
        [[[60 + 5 * v, 0, width / 2 + v], [0, 62 + 3 * v, height / 2 - v], [0, 0, 1]]
         for v in range(views)]
    ).astype(np.float32)  # fmt: skip
    extrinsics = np.stack(
        [np.c_[rotation(*(0.1 * rng.normal(size=3))), 0.3 * rng.normal(size=3)]
         for _ in range(views)]
    ).astype(np.float32)  # fmt: skip
    extrinsics[0] = np.eye(4)[:3]
    sky_map = None
    if sky:
        sky_map = np.zeros_like(depth)
        sky_map[:, : height // 4] = 0.9
    prediction = Prediction(
        depth, rng.random(depth.shape).astype(np.float32) + 1, sky_map, intrinsics, extrinsics,
        False, "relative",
    )  # fmt: skip
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(views)]
    return prediction, images


def check_projection(xyz, view, row, col, depth, intrinsics, extrinsics) -> None:
    """Every point projects into its source view within PIXEL_TOLERANCE of its pixel's centre,
    at that pixel's depth."""
    for index in np.unique(view):
        mine = view == index
        pose = np.asarray(extrinsics[index], dtype=np.float64)
        camera = np.asarray(xyz[mine], dtype=np.float64) @ pose[:, :3].T + pose[:, 3]
        pixels = camera @ np.asarray(intrinsics[index], dtype=np.float64).T
        u, v = pixels[:, 0] / pixels[:, 2], pixels[:, 1] / pixels[:, 2]
        assert np.abs(u - (col[mine] + 0.5)).max() < PIXEL_TOLERANCE
        assert np.abs(v - (row[mine] + 0.5)).max() < PIXEL_TOLERANCE
        expected = np.asarray(depth[index])[row[mine], col[mine]]
        np.testing.assert_allclose(camera[:, 2], expected, rtol=1e-5)


def read_colmap(data: bytes, folder: Path, text: bool = False) -> pycolmap.Reconstruction:
    zipfile.ZipFile(io.BytesIO(data)).extractall(folder)
    reconstruction = pycolmap.Reconstruction()
    if text:
        reconstruction.read_text(str(folder / "sparse" / "0"))
    else:
        reconstruction.read_binary(str(folder / "sparse" / "0"))
    return reconstruction


def colmap_points(reconstruction: pycolmap.Reconstruction) -> dict[str, np.ndarray]:
    """Point id order: xyz, rgb, and the view, row and column of each track's first element
    (the point's own pixel); every element's 2D point names the point."""
    ids = sorted(reconstruction.points3D)
    xyz, rgb, view, row, col = [], [], [], [], []
    for point_id in ids:
        point = reconstruction.points3D[point_id]
        for other in point.track.elements:
            seen = reconstruction.images[other.image_id].points2D[other.point2D_idx]
            assert seen.point3D_id == point_id
        element = point.track.elements[0]
        image = reconstruction.images[element.image_id]
        observed = image.points2D[element.point2D_idx]
        assert observed.point3D_id == point_id
        x, y = observed.xy
        xyz.append(point.xyz), rgb.append(point.color), view.append(element.image_id - 1)
        col.append(x - 0.5), row.append(y - 0.5)
    as_int = lambda values: np.rint(np.array(values)).astype(int)  # noqa: E731
    return {"xyz": np.array(xyz), "rgb": np.array(rgb), "view": np.array(view),
            "row": as_int(row), "col": as_int(col), "ids": np.array(ids)}  # fmt: skip


def check_colmap(
    reconstruction, intrinsics, extrinsics, sizes, count, extension="png"
) -> dict[str, np.ndarray]:
    """Cameras and poses equal the given ones to 1e-6, `count` points, each point's own pixel
    (its track's first element) reprojects (by COLMAP's own camera model) within
    PIXEL_TOLERANCE, and every stored error is the one pycolmap computes for the track."""
    assert len(reconstruction.images) == len(sizes) == len(reconstruction.cameras)
    for index, (width, height) in enumerate(sizes):
        image = reconstruction.images[index + 1]
        assert image.name == f"view_{index:03d}.{extension}"
        camera = reconstruction.cameras[image.camera_id]
        assert camera.model == pycolmap.CameraModelId.PINHOLE
        assert (camera.width, camera.height) == (width, height)
        k = np.asarray(intrinsics[index], dtype=np.float64)
        np.testing.assert_allclose(camera.params, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], atol=1e-6)
        pose = image.cam_from_world().matrix()
        np.testing.assert_allclose(pose, np.asarray(extrinsics[index]), atol=1e-6)
    assert len(reconstruction.points3D) == count
    stored = {point_id: point.error for point_id, point in reconstruction.points3D.items()}
    reconstruction.update_point_3d_errors()
    for point_id, point in reconstruction.points3D.items():
        assert abs(point.error - stored[point_id]) < ERROR_TOLERANCE, (point_id, point.error)
    for point in reconstruction.points3D.values():
        element = point.track.elements[0]
        image = reconstruction.images[element.image_id]
        camera = reconstruction.cameras[image.camera_id]
        projected = camera.img_from_cam(image.cam_from_world() * point.xyz)
        observed = image.points2D[element.point2D_idx].xy
        assert np.abs(projected - observed).max() < PIXEL_TOLERANCE
    return colmap_points(reconstruction)


def read_ply(data: bytes) -> np.ndarray:
    ply = plyfile.PlyData.read(io.BytesIO(data))
    assert ply.header.startswith("ply\nformat binary_little_endian 1.0") or not ply.text
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == [
        "x", "y", "z", "red", "green", "blue", "confidence"
    ]  # fmt: skip
    assert [p.val_dtype for p in vertex.properties] == ["f4"] * 3 + ["u1"] * 3 + ["f4"]
    return vertex.data


def read_glb(data: bytes) -> tuple[trimesh.PointCloud | None, dict[str, trimesh.path.Path3D]]:
    scene = trimesh.load(io.BytesIO(data), file_type="glb")
    clouds = [g for g in scene.geometry.values() if isinstance(g, trimesh.PointCloud)]
    frustums = {n: g for n, g in scene.geometry.items() if isinstance(g, trimesh.path.Path3D)}
    assert len(clouds) <= 1 and len(clouds) + len(frustums) == len(scene.geometry)
    return (clouds[0] if clouds else None), frustums


# ---- the fused points --------------------------------------------------------------------------


@pytest.mark.parametrize("views", [1, 3])
def test_every_point_projects_onto_its_pixel_centre(views):
    prediction, images = synthetic(views)
    everything = SceneOptions(conf_percentile=0, max_points=10**9, remove_edges=False)
    points = fuse(prediction, images, everything)
    assert len(points) == prediction.depth.size and points.removed["confidence"] == 0
    check_projection(points.xyz, points.view, points.row, points.col, prediction.depth,
                     prediction.intrinsics, prediction.extrinsics)  # fmt: skip
    for index, image in enumerate(images):
        mine = points.view == index
        np.testing.assert_array_equal(points.rgb[mine], image[points.row[mine], points.col[mine]])
    # The first view's camera frame is the world frame: x right, y down, z forward.
    first = (points.view == 0) & (points.row == 0) & (points.col == 0)
    x, y, z = points.xyz[first][0]
    assert x < 0 and y < 0 and z > 0


def test_a_single_view_without_extrinsics_is_in_its_camera_frame():
    prediction, images = synthetic(1)
    prediction.extrinsics = None
    points = fuse(prediction, images, SceneOptions(conf_percentile=0, remove_edges=False))
    check_projection(points.xyz, points.view, points.row, points.col, prediction.depth,
                     prediction.intrinsics, [np.eye(4)[:3]])  # fmt: skip
    several, images = synthetic(2)
    several.extrinsics = None
    with pytest.raises(ValueError, match="no common frame"):
        fuse(several, images, SceneOptions())


def brute_force_edges(depth: np.ndarray) -> np.ndarray:
    """The definition, literally: some 3x3 neighbour differs by more than 5 % of the depth
    (a NaN neighbour is no difference; an infinite one is)."""
    height, width = depth.shape
    edges = np.zeros(depth.shape, dtype=bool)
    for i in range(height):
        for j in range(width):
            for a in range(max(i - 1, 0), min(i + 2, height)):
                for b in range(max(j - 1, 0), min(j + 2, width)):
                    jump = abs(float(depth[a, b]) - float(depth[i, j]))
                    if not np.isnan(jump) and jump > 0.05 * depth[i, j]:
                        edges[i, j] = True
    return edges


def kept_set(points) -> set[tuple[int, int, int]]:
    return set(zip(points.view.tolist(), points.row.tolist(), points.col.tolist(), strict=True))


@pytest.mark.parametrize("percentile", [0, 40, 77.5, 100])
def test_each_filter_removes_what_it_says(percentile):
    prediction, images = synthetic(2, sky=True)
    depth = prediction.depth
    depth[0, 30:, 40:] += 1.0  # a step: edges along it
    depth[1, 5, 7], depth[1, 6, 9], depth[0, 40, 3] = np.nan, -1.0, np.inf
    prediction.confidence[1, 20, 20] = np.nan
    invalid = ~(np.isfinite(depth) & (depth > 0) & np.isfinite(prediction.confidence))
    sky = prediction.sky >= 0.5
    edges = np.stack([brute_force_edges(d) for d in depth])
    left = ~invalid & ~sky & ~edges
    threshold = np.percentile(prediction.confidence[left], percentile)
    kept = left & (prediction.confidence >= threshold)
    points = fuse(prediction, images, SceneOptions(conf_percentile=percentile, max_points=10**9))
    assert kept_set(points) == set(zip(*map(np.ndarray.tolist, np.nonzero(kept)), strict=True))
    assert points.removed == {
        "invalid": int(invalid.sum()), "sky": int((sky & ~invalid).sum()),
        "edges": int((edges & ~sky & ~invalid).sum()), "confidence": int((left & ~kept).sum()),
        "voxel": 0,
    }  # fmt: skip
    assert points.confidence_threshold == pytest.approx(float(threshold))
    np.testing.assert_array_equal(
        points.confidence, prediction.confidence[points.view, points.row, points.col]
    )
    keep_all = SceneOptions(conf_percentile=0, keep_sky=True, remove_edges=False)
    assert kept_set(fuse(prediction, images, keep_all)) == set(
        zip(*map(np.ndarray.tolist, np.nonzero(~invalid)), strict=True)
    )


def test_without_confidence_the_percentile_is_skipped_with_a_warning():
    prediction, images = synthetic(1)
    prediction.confidence = None
    points = fuse(prediction, images, SceneOptions(remove_edges=False))
    assert len(points) == prediction.depth.size and np.isnan(points.confidence).all()
    assert "conf_percentile is not applied" in points.warnings[0]
    assert points.confidence_threshold is None


def voxel_of(xyz: np.ndarray, size: float) -> np.ndarray:
    """Each point's voxel at `size`, anchored at the minimum corner, as the thinning computes it
    (float32 offsets)."""
    offsets = np.asarray(xyz, np.float32) - np.asarray(xyz, np.float32).min(axis=0)
    return np.floor(offsets * np.float32(1.0 / size)).astype(np.int64)


@pytest.mark.parametrize("max_points", [1, 500, 4000])
def test_max_points_keeps_the_first_original_point_of_each_voxel(max_points):
    prediction, images = synthetic(3, height=60, width=80)
    options = {"conf_percentile": 0, "remove_edges": False}
    everything = fuse(prediction, images, SceneOptions(max_points=10**9, **options))
    points = fuse(prediction, images, SceneOptions(max_points=max_points, **options))
    assert 0.8 * max_points <= len(points) <= max_points
    assert points.removed["voxel"] == len(everything) - len(points)
    # Original points: each is one of the unthinned cloud's, with its pixel, colour and all.
    position = {key: index for index, key in enumerate(kept_set_list(everything))}
    chosen = np.array([position[key] for key in kept_set_list(points)])
    np.testing.assert_array_equal(points.xyz, everything.xyz[chosen])
    np.testing.assert_array_equal(points.rgb, everything.rgb[chosen])
    # One point per occupied voxel of the reported size: the first (lowest index) in it.
    cells = [tuple(c) for c in voxel_of(everything.xyz, points.voxel_size).tolist()]
    first: dict[tuple, int] = {}
    for index, cell in enumerate(cells):
        first.setdefault(cell, index)
    assert sorted(first.values()) == chosen.tolist()
    again = fuse(prediction, images, SceneOptions(max_points=max_points, **options))
    np.testing.assert_array_equal(again.xyz, points.xyz)


def kept_set_list(points) -> list[tuple[int, int, int]]:
    return list(zip(points.view.tolist(), points.row.tolist(), points.col.tolist(), strict=True))


def test_voxel_thinning_alone_is_deterministic_and_bounded():
    rng = np.random.default_rng(5)
    xyz = rng.normal(size=(30_000, 3)).astype(np.float32)
    for max_points in (1, 10, 2_000, 29_999, 30_000):
        chosen, size = voxel_thin(xyz, max_points)
        assert len(chosen) <= max_points and (np.diff(chosen) > 0).all()
        assert (size is None) == (max_points >= len(xyz))
        np.testing.assert_array_equal(voxel_thin(xyz, max_points)[0], chosen)
    flat = np.zeros((100, 3), dtype=np.float32)  # every point in one place
    assert voxel_thin(flat, 10)[0].tolist() == [0]


# ---- the files ---------------------------------------------------------------------------------


def test_scene_ply_reads_back_with_plyfile():
    prediction, images = synthetic(2)
    points = fuse(prediction, images, SceneOptions(remove_edges=False))
    vertices = read_ply(scene_ply(points, "relative"))
    xyz = np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1)
    np.testing.assert_array_equal(xyz, points.xyz)
    rgb = np.stack([vertices["red"], vertices["green"], vertices["blue"]], axis=1)
    np.testing.assert_array_equal(rgb, points.rgb)
    np.testing.assert_array_equal(vertices["confidence"], points.confidence)


def test_scene_glb_loads_in_trimesh_with_one_frustum_per_view():
    prediction, images = synthetic(3)
    points = fuse(prediction, images, SceneOptions(max_points=1000))
    cloud, frustums = read_glb(scene_glb(points, prediction))
    assert len(cloud.vertices) == len(points) <= 1000
    np.testing.assert_allclose(cloud.vertices, points.xyz * [1, -1, -1], rtol=1e-6)
    np.testing.assert_array_equal(cloud.colors[:, :3], points.rgb)
    assert sorted(frustums) == ["camera_000", "camera_001", "camera_002"]
    for index, name in enumerate(sorted(frustums)):
        pose = prediction.extrinsics[index].astype(np.float64)
        centre = -pose[:, :3].T @ pose[:, 3]
        # A glTF LINES primitive: 8 segments (vertex pairs, in trimesh's order), 4 from the
        # apex (the camera centre) to the image corners, 4 around the image rectangle.
        segments = np.asarray(frustums[name].vertices).reshape(8, 2, 3)  # float32 in the file
        at_apex = np.abs(segments - centre * [1, -1, -1]).max(axis=2) < 1e-5
        assert at_apex.any(axis=1).sum() == 4 and at_apex.sum() == 4
        edges = {tuple(sorted(map(tuple, pair))) for pair in segments.round(5).tolist()}
        assert len(edges) == 8 and len(np.unique(segments.round(5).reshape(-1, 3), axis=0)) == 5


GLTF_TOLERANCE = 1e-3  # px: a point through a glTF camera against its pixel's centre


def test_scene_glb_has_a_gltf_camera_per_view_that_looks_at_its_pixels(tmp_path):
    """Khronos' validator finds no error; three.js builds one camera per view, and each scene
    point seen through its view's camera (three.js's own matrices) lands on its pixel. The
    principal points are centred here: that is what a glTF camera can say exactly."""
    prediction, images = synthetic(3)
    height, width = prediction.depth.shape[1:]
    prediction.intrinsics[:, 0, 2], prediction.intrinsics[:, 1, 2] = width / 2, height / 2
    points = fuse(prediction, images, SceneOptions(max_points=1000))
    read = read_glb_in_node(scene_glb(points, prediction), tmp_path)
    assert read["validator"]["errors"] == 0, read["validator"]["messages"]
    cameras = read["cameras"]
    assert [camera["name"] for camera in cameras] == ["view_000", "view_001", "view_002"]
    for index, camera in enumerate(cameras):
        assert camera["type"] == "PerspectiveCamera"
        extras = camera["extras"]
        assert (extras["view"], extras["width"], extras["height"]) == (index, width, height)
        np.testing.assert_array_equal(extras["intrinsics"], prediction.intrinsics[index])
        mine = points.view == index
        assert mine.sum() > 100
        pixels = three_js_pixels(camera, points.xyz[mine] * [1, -1, -1], width, height)
        expected = np.stack([points.col[mine], points.row[mine]], axis=1) + 0.5
        assert np.abs(pixels - expected).max() < GLTF_TOLERANCE


def test_a_glb_camera_off_centre_keeps_its_focal_lengths_and_the_exact_intrinsics(tmp_path):
    """A principal point off the image centre: glTF's camera is the centred one with the same
    focal lengths (points land off by exactly that offset), the extras hold the truth."""
    prediction, images = synthetic(2)
    height, width = prediction.depth.shape[1:]
    prediction.intrinsics[:, :2, 2] += [3.0, -2.0]
    points = fuse(prediction, images, SceneOptions(max_points=1000))
    read = read_glb_in_node(scene_glb(points, prediction), tmp_path)
    assert read["validator"]["errors"] == 0, read["validator"]["messages"]
    for index, camera in enumerate(read["cameras"]):
        k = prediction.intrinsics[index].astype(np.float64)
        np.testing.assert_allclose(camera["fov"], np.degrees(2 * np.arctan(height / 2 / k[1, 1])))
        np.testing.assert_allclose(camera["aspect"], (width / k[0, 0]) / (height / k[1, 1]))
        mine = points.view == index
        pixels = three_js_pixels(camera, points.xyz[mine] * [1, -1, -1], width, height)
        offset = np.array([k[0, 2] - width / 2, k[1, 2] - height / 2])
        expected = np.stack([points.col[mine], points.row[mine]], axis=1) + 0.5 - offset
        assert np.abs(offset).min() >= 1
        assert np.abs(pixels - expected).max() < GLTF_TOLERANCE


def test_colmap_model_reads_back_with_pycolmap(tmp_path):
    prediction, images = synthetic(3)
    points = fuse(prediction, images, SceneOptions(max_points=2000))
    data = colmap_zip(points, prediction, images, text=True)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
        names = set(archive.namelist())
        png = Image.open(io.BytesIO(archive.read("images/view_001.png")))
        assert png.format == "PNG" and not png.getexif()
        np.testing.assert_array_equal(np.asarray(png), images[1])  # lossless
    assert {f"sparse/0/{n}.{e}" for n in ("cameras", "images", "points3D") for e in ("bin", "txt")
            } | {f"images/view_00{i}.png" for i in range(3)} == names  # fmt: skip
    sizes = [(64, 48)] * 3
    binary = read_colmap(data, tmp_path / "bin")
    got = check_colmap(binary, prediction.intrinsics, prediction.extrinsics, sizes, len(points))
    np.testing.assert_array_equal(got["xyz"], points.xyz.astype(np.float64))
    np.testing.assert_array_equal(got["rgb"], points.rgb)
    assert (got["view"] == points.view).all() and (got["row"] == points.row).all()
    assert (got["col"] == points.col).all()
    text = read_colmap(data, tmp_path / "txt", text=True)
    from_text = check_colmap(text, prediction.intrinsics, prediction.extrinsics, sizes,
                             len(points))  # fmt: skip
    np.testing.assert_array_equal(from_text["xyz"], got["xyz"])
    assert colmap_zip(points, prediction, images, text=True) == data  # byte-identical


def test_colmap_images_as_jpeg_444_on_request(tmp_path):
    prediction, images = synthetic(2)
    points = fuse(prediction, images, SceneOptions(max_points=2000))
    data = colmap_zip(points, prediction, images, image_format="jpg")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        jpeg = Image.open(io.BytesIO(archive.read("images/view_001.jpg")))
        assert jpeg.format == "JPEG" and JpegImagePlugin.get_sampling(jpeg) == 0  # 4:4:4
    binary = read_colmap(data, tmp_path / "jpg")
    check_colmap(binary, prediction.intrinsics, prediction.extrinsics, [(64, 48)] * 2,
                 len(points), extension="jpg")  # fmt: skip
    with pytest.raises(ValueError, match="image_format must be one of"):
        colmap_zip(points, prediction, images, image_format="webp")


def test_colmap_tracks_list_every_view_the_voxel_grid_merged(tmp_path):
    """Where the voxel grid merged pixels of several views into one point, its track lists one
    observation per view (its own pixel first), each at a pixel of that view in the point's
    voxel; the stored error is the track's mean reprojection error (pycolmap's own, checked
    in check_colmap), above zero for merged tracks; the text model says the same."""
    prediction, images = synthetic(3)
    points = fuse(prediction, images, SceneOptions(max_points=1500), tracks=True)
    assert points.voxel_size is not None and len(points.merged) > 0
    data = colmap_zip(points, prediction, images, text=True)
    binary = read_colmap(data, tmp_path / "bin")
    sizes = [(64, 48)] * 3
    got = check_colmap(binary, prediction.intrinsics, prediction.extrinsics, sizes, len(points))
    assert (got["view"] == points.view).all() and (got["row"] == points.row).all()
    lengths = np.array([len(binary.points3D[i].track.elements) for i in got["ids"]])
    assert lengths.max() == 3 and (lengths > 1).sum() > 50
    assert len(points.merged) == (lengths - 1).sum()
    for point_id in got["ids"][lengths > 1][:200]:
        point = binary.points3D[point_id]
        views = [element.image_id - 1 for element in point.track.elements]
        assert len(set(views)) == len(views)
        assert point.error > 0
        for element in point.track.elements[1:]:
            image = binary.images[element.image_id]
            x, y = image.points2D[element.point2D_idx].xy
            # The merged pixel's own 3D point lies in the same voxel as this point.
            depth = prediction.depth[element.image_id - 1][int(y), int(x)]
            pose = prediction.extrinsics[element.image_id - 1].astype(np.float64)
            ray = np.linalg.inv(prediction.intrinsics[element.image_id - 1]) @ [x, y, 1]
            own = pose[:, :3].T @ (depth * ray - pose[:, 3])
            assert np.abs(own - point.xyz).max() < 1.01 * points.voxel_size
    assert binary.compute_mean_reprojection_error() > 0
    text = read_colmap(data, tmp_path / "txt", text=True)
    for point_id in got["ids"]:
        mine, theirs = binary.points3D[point_id], text.points3D[point_id]
        assert [(e.image_id, e.point2D_idx) for e in mine.track.elements] == [
            (e.image_id, e.point2D_idx) for e in theirs.track.elements
        ]
        assert abs(mine.error - theirs.error) < 1e-12  # the text is read back to ~1e-9 relative


def test_without_thinning_every_track_is_its_own_pixel(tmp_path):
    prediction, images = synthetic(2)
    points = fuse(prediction, images, SceneOptions(max_points=100_000), tracks=True)
    assert points.voxel_size is None and points.merged is None
    binary = read_colmap(colmap_zip(points, prediction, images), tmp_path / "bin")
    check_colmap(binary, prediction.intrinsics, prediction.extrinsics, [(64, 48)] * 2,
                 len(points))  # fmt: skip
    assert {len(point.track.elements) for point in binary.points3D.values()} == {1}


def test_skewed_intrinsics_are_not_a_colmap_camera():
    prediction, images = synthetic(1)
    prediction.intrinsics[0, 0, 1] = 0.5
    points = fuse(prediction, images, SceneOptions())
    with pytest.raises(ValueError, match="skew"):
        colmap_zip(points, prediction, images)


def test_rotation_to_quaternion_agrees_with_colmap():
    rng = np.random.default_rng(3)
    rotations = np.stack([rotation(*rng.uniform(-np.pi, np.pi, 3)) for _ in range(200)])
    rotations[0], rotations[1] = np.eye(3), np.diag([1.0, -1.0, -1.0])  # w = 0: a half turn
    ours = rotation_to_quaternion(rotations)
    for matrix, quaternion in zip(rotations, ours, strict=True):
        x, y, z, w = pycolmap.Rotation3d(matrix).quat
        theirs = np.array([w, x, y, z]) * (1 if w >= 0 else -1)
        if abs(w) < 1e-9:  # q and -q are the same rotation
            theirs *= np.sign(theirs @ quaternion)
        np.testing.assert_allclose(quaternion, theirs, atol=1e-9)


def opencv_exr(data: bytes) -> np.ndarray:
    """An EXR as OpenCV decodes it (its EXR codec is off unless OPENCV_IO_ENABLE_OPENEXR=1, which
    OpenCV reads when the module loads)."""
    os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_depth_exr_reads_back_bit_exactly():
    depth = np.random.default_rng(0).random((37, 53)).astype(np.float32) * 100
    depth[0, 0], depth[1, 1], depth[2, 2], depth[3, 3] = np.nan, np.inf, -2.5, 1e-30
    with OpenEXR.File(io.BytesIO(depth_exr(depth)), separate_channels=True) as exr:
        channels = exr.channels()
        assert list(channels) == ["Y"] and channels["Y"].type() == OpenEXR.FLOAT
        pixels = channels["Y"].pixels
    assert pixels.dtype == np.float32 and pixels.shape == depth.shape
    np.testing.assert_array_equal(pixels.view(np.uint32), depth.view(np.uint32))
    # OpenCV (and Blender) read a lone "Y" channel as the grey image; a lone "Z" read as zeros.
    seen = opencv_exr(depth_exr(depth))
    assert seen.dtype == np.float32 and seen.shape == depth.shape
    np.testing.assert_array_equal(seen.view(np.uint32), depth.view(np.uint32))


def test_depth_mm_png_is_millimetres_with_zero_invalid():
    depth = np.array([[1.0, 0.0004, 65.5349, 65.536], [np.nan, -1.0, np.inf, 2.0006]], np.float32)
    encoded = depth_mm_png(depth)
    with Image.open(io.BytesIO(encoded.png)) as png:
        values = np.asarray(png).astype(int)
        assert png.text["units"] == "mm"
    assert values.tolist() == [[1000, 1, 65535, 65535], [0, 0, 0, 2001]]
    assert encoded.saturated == 1  # 65.536 m; inf is invalid, not saturated


def test_the_unavailable_output_rule():
    def reasons(model: str, **fields) -> list[str]:
        request = parse_request({"image_url": "u", **fields} if "images" not in fields else fields)
        return unavailable_outputs(request, lookup_model(model))

    k = [[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]]
    two = {"images": [{"url": "a"}, {"url": "b"}]}
    assert reasons("da3mono-large", outputs=["scene_glb"])[0].startswith("scene_glb: ")
    assert "send intrinsics" in reasons("da3mono-large", outputs=["scene_glb"])[0]
    assert reasons("da3mono-large", outputs=list(SCENE_OUTPUTS), intrinsics=k) == []
    several = reasons("da3mono-large", outputs=["colmap"], intrinsics=[k, k], **two)
    assert "no common frame" in several[0]
    assert reasons("da3-small", outputs=list(SCENE_OUTPUTS), **two) == []
    assert reasons("da3metric-large", outputs=["depth_mm_png"]) == []
    assert "relative depth" in reasons("da3metric-large", outputs=["depth_mm_png"],
                                       output_metric=False)[0]  # fmt: skip
    e = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]
    posed = reasons("da3nested-giant-large", outputs=["depth_mm_png"], intrinsics=k, extrinsics=e)
    assert "the poses' units" in posed[0]
    assert reasons("da3-small", outputs=["confidence_npy", "sky_mask"])[0].startswith("sky_mask")


# ---- the real request path ---------------------------------------------------------------------


def photo(path: Path) -> dict[str, str]:
    return {"base64": base64.b64encode(path.read_bytes()).decode()}


@pytest.fixture(scope="module")
def service(hf_cache, tmp_path_factory) -> Service:
    return Service(offline_settings(hf_cache, tmp_path_factory.mktemp("workspace")))


def scene_request(**fields) -> dict:
    return {
        "api_key": TEST_API_KEY, "images": [photo(p) for p in PHOTOS], "process_res": RES,
        "outputs": ["depth", "depth_npy", "depth_exr", "confidence_npy", *SCENE_OUTPUTS],
        "max_points": 20_000, **fields,
    }  # fmt: skip


def decoded(entry: dict) -> bytes:
    """An output's bytes: inline, or from the volume when it did not fit the response."""
    if "base64" in entry:
        return base64.b64decode(entry["base64"])
    return Path(entry["path"]).read_bytes()


def check_scene_response(body: dict, tmp_path: Path) -> dict[str, np.ndarray]:
    """Every scene file read back and checked against the response's own cameras and depth."""
    RunResponse.model_validate(body)
    views = body["views"]
    for name in SCENE_OUTPUTS:
        assert all(name not in view for view in views), f"{name} is top level only"
    depth = [np.load(io.BytesIO(decoded(view["depth_npy"]))) for view in views]
    for view, exact in zip(views, depth, strict=True):
        seen = opencv_exr(decoded(view["depth_exr"]))
        assert seen.view(np.uint32).tolist() == exact.view(np.uint32).tolist()
    intrinsics = [view["intrinsics"] for view in views]
    extrinsics = [view["extrinsics"] for view in views]
    sizes = [(view["width"], view["height"]) for view in views]
    count = body["scene"]["points"]
    assert 0 < count <= 20_000
    got = check_colmap(read_colmap(decoded(body["colmap"]), tmp_path / "colmap"), intrinsics,
                       extrinsics, sizes, count)  # fmt: skip
    check_projection(got["xyz"], got["view"], got["row"], got["col"], depth, intrinsics,
                     extrinsics)  # fmt: skip
    vertices = read_ply(decoded(body["scene_ply"]))
    xyz = np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1)
    np.testing.assert_array_equal(xyz.astype(np.float64), got["xyz"])
    confidence = [np.load(io.BytesIO(decoded(view["confidence_npy"]))) for view in views]
    expected = [confidence[v][r, c] for v, r, c in zip(got["view"], got["row"], got["col"],
                                                        strict=True)]  # fmt: skip
    np.testing.assert_array_equal(vertices["confidence"], expected)
    cloud, frustums = read_glb(decoded(body["scene_glb"]))
    np.testing.assert_allclose(cloud.vertices, xyz * [1, -1, -1], rtol=1e-6)
    assert len(frustums) == len(views)
    in_node = read_glb_in_node(decoded(body["scene_glb"]), tmp_path)
    assert in_node["validator"]["errors"] == 0, in_node["validator"]["messages"]
    assert len(in_node["cameras"]) == len(views)
    return got


def test_scene_of_predicted_cameras(service, tmp_path):
    body = service.handle(scene_request())
    assert body["units"] == "relative" and body["views"][0]["extrinsics"] == np.eye(4)[:3].tolist()
    got = check_scene_response(body, tmp_path)
    assert set(got["view"].tolist()) == {0, 1}
    assert sum(body["scene"]["removed"].values()) + body["scene"]["points"] == 2 * 680 * 1208
    assert "scene" in body["timings_ms"]


def test_scene_of_given_cameras(service, tmp_path):
    k = [[900.0, 0, 604], [0, 900.0, 340], [0, 0, 1]]
    turned = np.c_[rotation(0.02, -0.2, 0.01), [-0.8, 0.05, 0.1]].tolist()
    body = service.handle(scene_request(intrinsics=[k, k],
                                        extrinsics=[np.eye(4)[:3].tolist(), turned]))  # fmt: skip
    assert body["units"] == "pose_units" and body["is_metric"] is False
    np.testing.assert_allclose(body["views"][1]["extrinsics"], turned, atol=1e-7)
    check_scene_response(body, tmp_path)


def test_the_same_request_gives_the_same_files(service):
    first, second = service.handle(scene_request()), service.handle(scene_request())
    for name in SCENE_OUTPUTS:
        assert decoded(first[name]) == decoded(second[name]), name
    assert decoded(first["views"][1]["depth_exr"]) == decoded(second["views"][1]["depth_exr"])


def test_colmap_text_on_request(service, tmp_path):
    body = service.handle(scene_request(outputs=["colmap"], colmap_text=True, max_points=3000))
    data = decoded(body["colmap"])
    assert "sparse/0/points3D.txt" in zipfile.ZipFile(io.BytesIO(data)).namelist()
    from_text = colmap_points(read_colmap(data, tmp_path / "t", text=True))
    from_binary = colmap_points(read_colmap(data, tmp_path / "b"))
    np.testing.assert_array_equal(from_text["xyz"], from_binary["xyz"])
    assert len(from_text["xyz"]) == body["scene"]["points"]


def test_big_scene_files_are_stored_and_the_warning_names_the_bucket(hf_cache, tmp_path):
    service = Service(offline_settings(hf_cache, tmp_path / "ws", max_response_bytes=3_000_000))
    body = service.handle(scene_request(outputs=list(SCENE_OUTPUTS), max_points=200_000))
    assert "base64" not in body["colmap"] and body["image_base64"]
    with zipfile.ZipFile(body["colmap"]["path"]) as archive:
        assert "sparse/0/points3D.bin" in archive.namelist()
    warning = next(w for w in body["warnings"] if "MAX_RESPONSE_BYTES" in w)
    assert "colmap" in warning and "BUCKET_ENDPOINT_URL" in warning


def test_scene_options_change_what_is_kept(service):
    def scene(**fields) -> dict:
        one_view = scene_request(images=[photo(PHOTOS[0])], outputs=["scene_ply"], **fields)
        return service.handle(one_view)["scene"]

    default = scene()
    assert default["removed"]["edges"] > 0 and default["removed"]["confidence"] > 0
    assert scene(remove_edges=False)["removed"]["edges"] == 0
    assert scene(conf_percentile=0)["removed"]["confidence"] == 0
    assert scene(max_points=1000)["points"] <= 1000


def test_the_server_refuses_more_points_than_it_allows(hf_cache, tmp_path):
    service = Service(offline_settings(hf_cache, tmp_path / "ws", max_points=1000))
    with pytest.raises(ServiceError, match="max_points 20000 is above this server's limit"):
        service.handle(scene_request())


# ---- the self-hosted server, the client and the CLI ---------------------------------------------


@pytest.mark.slow
def test_scene_through_the_server_client_and_cli(service_env, tmp_path):
    from da3_serverless.cli import main
    from da3_serverless.client import Client
    from servers import serve_process

    with serve_process(service_env, tmp_path / "serve.log") as (url, _):
        with Client(url, api_key=TEST_API_KEY, timeout=300) as client:
            result = client.depth(PHOTOS, process_res=RES, max_points=5000, colmap_text=True,
                                  outputs=["depth", "preview", *SCENE_OUTPUTS])  # fmt: skip
        assert client.download_outputs(result) == []
        assert len(read_ply(result.scene_ply)) == result.scene["points"] <= 5000
        cloud, frustums = read_glb(result.scene_glb)
        assert len(cloud.vertices) == result.scene["points"] and len(frustums) == 2
        assert read_colmap(result.colmap, tmp_path / "colmap").num_points3D() == len(cloud.vertices)
        assert result.views[1].preview is not None and result.depth_exr is None
        written = {p.name for p in result.save_all(tmp_path / "saved", "garden")}
        assert written == {"garden.view0.depth.png", "garden.view1.depth.png",
                           "garden.view0.preview.png", "garden.view1.preview.png",
                           "garden.scene.ply",
                           "garden.glb", "garden.colmap.zip", "garden.json"}  # fmt: skip
        assert (tmp_path / "saved" / "garden.glb").read_bytes() == result.scene_glb

        out = tmp_path / "cli"
        argv = ["request", *map(str, PHOTOS), "--scene", "--endpoint", url, "--api-key",
                TEST_API_KEY, "--out", str(out), "--process-res", str(RES), "--max-points",
                "3000"]  # fmt: skip
        assert main(argv) == 0
    assert len(read_ply((out / "scene.scene.ply").read_bytes())) <= 3000
    assert len(read_glb((out / "scene.glb").read_bytes())[1]) == 2
    assert read_colmap((out / "scene.colmap.zip").read_bytes(), tmp_path / "c2").num_images() == 2
    meta = json.loads((out / "scene.json").read_text())
    assert meta["scene_ply"]["base64"].endswith("base64 chars>") and len(meta["views"]) == 2
    with Image.open(out / "scene.view1.preview.png") as preview:
        assert preview.size == (1208, 680)


def test_the_client_downloads_outputs_given_as_urls_and_saves_fixed_names(tmp_path):
    """A bucket URL is fetched (without the client's keys); a volume path stays a path; file
    names never come from the server."""
    from contract_cases import serve_directory
    from da3_serverless.client import Client, parse_response

    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "x.zip").write_bytes(b"PK zip bytes")
    with serve_directory(tmp_path / "bucket") as bucket:
        response = {
            "width": 4, "height": 3, "min_depth": 0.0, "max_depth": 1.0, "image_base64": None,
            "units": "relative", "views": None,
            "colmap": {"url": f"{bucket}/x.zip", "media_type": "application/zip"},
            "scene_glb": {"path": "/elsewhere/../../etc/x.glb", "media_type": "model/gltf-binary"},
            "scene_ply": {"base64": base64.b64encode(b"ply").decode(), "media_type": "x"},
        }  # fmt: skip
        result = parse_response(response)
        with Client("http://127.0.0.1:9", api_key="secret") as client:
            assert client.download_outputs(result) == ["scene_glb"]
    assert result.colmap == b"PK zip bytes" and result.scene_ply == b"ply"
    written = sorted(p.name for p in result.save_all(tmp_path / "out", "s"))
    assert written == ["s.colmap.zip", "s.json", "s.scene.ply"]


def test_a_scene_with_no_point_left_still_gives_valid_files(tmp_path):
    prediction, images = synthetic(2)
    prediction.depth[:] = np.nan
    points = fuse(prediction, images, SceneOptions())
    assert len(points) == 0 and points.removed["invalid"] == prediction.depth.size
    assert len(read_ply(scene_ply(points, "relative"))) == 0
    cloud, frustums = read_glb(scene_glb(points, prediction))
    assert cloud is None and len(frustums) == 2
    data = colmap_zip(points, prediction, images, text=True)
    for text in (False, True):
        model = read_colmap(data, tmp_path / str(text), text=text)
        assert (model.num_points3D(), model.num_images()) == (0, 2)


def test_the_request_budget_counts_the_scene(hf_cache, tmp_path):
    """Scene outputs add their host memory to the request's price, refused before decoding."""
    from da3_serverless.api.budget import HOST_BYTES_PER_PIXEL, estimate_cost
    from da3_serverless.exports.points import scene_bytes

    sizes = [(1208, 680)] * 2
    plain = estimate_cost(SMALL_REPO, RES, sizes)
    scene = estimate_cost(SMALL_REPO, RES, sizes, scene_points=20_000)
    assert plain.scene_pixels == 0 and scene.pixels == plain.pixels
    assert scene.scene_pixels * HOST_BYTES_PER_PIXEL >= scene_bytes(plain.pixels, 20_000)
    service = Service(
        offline_settings(hf_cache, tmp_path / "ws", request_budget_pixels=plain.pixels)
    )
    with pytest.raises(ServiceError) as error:
        service.handle(scene_request())
    assert error.value.code == "request_too_large" and "lower max_points" in error.value.message
