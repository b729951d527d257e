"""Anchors: known depths and distances fix the answer's scale.

Oracle tests build a synthetic scene (two planes seen by two cameras) with known depth and
cameras, hand the fit a prediction off by a known scale (and, for the monocular relative
model, a known shift in inverse depth) and check the fit recovers it within 0.1 %, with 20 %
outliers among the anchors too; then the same through the real service with a random
da3-small, whose relative answer the anchors bring to metres.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_API_KEY, offline_settings
from da3_serverless.api.anchors import Anchors, decode_anchor_maps, fit_anchors
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import RunResponse
from da3_serverless.inference.prediction import Gaussians, Prediction
from da3_serverless.service import Service
from paths import IMAGES

H, W = 48, 64
TRUE_SCALE = 3.7
TOLERANCE = 1e-3  # the 0.1 %
K = np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]], np.float32)


def _pose(angle: float, tx: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s, tx], [0, 1, 0, 0.1], [-s, 0, c, 0.2]], np.float32)


def _truth() -> Prediction:
    """Two views of a slanted plane: true metric depth, cameras and a confidence map."""
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float32)
    depth = np.stack([2.0 + 0.02 * cols + 0.01 * rows, 3.0 + 0.015 * rows])
    confidence = np.stack([1.0 + 0.01 * cols, 2.0 + 0.0 * cols])
    return Prediction(
        depth=depth.astype(np.float32), confidence=confidence.astype(np.float32),
        sky=np.zeros_like(depth), intrinsics=np.stack([K, K]),
        extrinsics=np.stack([_pose(0.0, 0.0), _pose(0.3, -0.5)]), is_metric=True, units="m",
    )  # fmt: skip


def _off_by_scale(truth: Prediction) -> Prediction:
    """What an any-view relative model would answer: everything metric divided by the scale."""
    extrinsics = truth.extrinsics.copy()
    extrinsics[:, :, 3] /= TRUE_SCALE
    means = np.ones((2, 4, 4, 3), np.float32)
    gaussians = Gaussians(means, means * 0.1, np.ones((2, 4, 4, 4), np.float32),
                          np.ones((2, 4, 4), np.float32), means)  # fmt: skip
    return Prediction(
        depth=truth.depth / TRUE_SCALE, confidence=truth.confidence, sky=truth.sky,
        intrinsics=truth.intrinsics, extrinsics=extrinsics, is_metric=False, units="relative",
        gaussians=gaussians,
    )  # fmt: skip


def _points(truth: Prediction, view: int, count: int, seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    xs, ys = rng.uniform(0, W, count), rng.uniform(0, H, count)
    return [[x, y, float(truth.depth[view][int(y), int(x)])] for x, y in zip(xs, ys, strict=True)]


def _close(value: float, expected: float) -> bool:
    return abs(value / expected - 1) < TOLERANCE


def test_points_recover_the_scale_and_it_reaches_depth_cameras_and_gaussians():
    truth = _truth()
    anchors = Anchors(points=[_points(truth, 0, 12, 1), _points(truth, 1, 12, 2)])
    fitted, report = fit_anchors(anchors, [], _off_by_scale(truth))
    assert _close(report["scale"], TRUE_SCALE) and report["fitted"] and report["outliers"] == 0
    assert fitted.units == "m" and fitted.is_metric
    np.testing.assert_allclose(fitted.depth, truth.depth, rtol=TOLERANCE)
    np.testing.assert_allclose(fitted.extrinsics, truth.extrinsics, rtol=TOLERANCE, atol=1e-6)
    np.testing.assert_allclose(fitted.gaussians.means, TRUE_SCALE, rtol=TOLERANCE)
    np.testing.assert_allclose(fitted.gaussians.scales, 0.1 * TRUE_SCALE, rtol=TOLERANCE)
    assert report["residual_m"]["max"] < 1e-4


def test_twenty_percent_outliers_do_not_move_the_fit():
    truth = _truth()
    points = _points(truth, 0, 40, 3)
    for point in points[::5]:  # every fifth anchor is wrong by a factor of 2 to 5
        point[2] *= 2.0 + (point[0] % 3.0)
    _, report = fit_anchors(Anchors(points=points), [], _off_by_scale(truth))
    assert _close(report["scale"], TRUE_SCALE)
    assert report["outliers"] == 8 and len(report["rejected"]) == 8
    assert report["rejected"][0] == "points[0][0]"


def _png16(values_mm: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(values_mm.astype(np.uint16)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _lidar(truth: Prediction, view: int, rotate: int = 0) -> np.ndarray:
    """A 24x32 map of the view's true depth in millimetres (holes as zeros), sampled at the
    map pixels' centres as a sensor covering the same field of view would see it."""
    rows = ((np.arange(24) + 0.5) * H / 24).astype(int)
    cols = ((np.arange(32) + 0.5) * W / 32).astype(int)
    values = np.round(truth.depth[view][np.ix_(rows, cols)] * 1000)
    values[::3, ::4] = 0
    return np.rot90(values, rotate)


def test_a_sparse_depth_png_recovers_the_scale_in_sensor_orientation_too():
    truth = _truth()
    for orientation, turns in ((1, 0), (6, 1), (8, 3), (3, 2)):  # stored turned back by EXIF
        entry = {"view": 1, "base64": _png16(_lidar(truth, 1, turns)), "scale": 0.001,
                 "orientation": orientation}  # fmt: skip
        anchors = Anchors(sparse_depth=[entry])
        maps = decode_anchor_maps(anchors, views=2, max_chars=10**7)
        assert maps[0][1].shape == (24, 32)
        _, report = fit_anchors(anchors, maps, _off_by_scale(truth))
        # millimetre rounding of ~3 m depths: well inside 0.1 %
        assert _close(report["scale"], TRUE_SCALE), (orientation, report["scale"])
        assert report["outliers"] == 0


def test_a_float_npy_map_and_a_distance_across_two_views():
    truth = _truth()
    buffer = io.BytesIO()
    np.save(buffer, _lidar(truth, 0) / 1000.0)
    npy = {"base64": base64.b64encode(buffer.getvalue()).decode()}
    anchors = Anchors(sparse_depth=[npy])
    _, report = fit_anchors(anchors, decode_anchor_maps(anchors, 2, 10**7), _off_by_scale(truth))
    assert _close(report["scale"], TRUE_SCALE)
    a, b = (0, 10.5, 20.5), (1, 40.5, 30.5)
    ends = []
    for view, x, y in (a, b):
        depth = float(truth.depth[view][int(y), int(x)])
        camera = np.linalg.solve(K.astype(np.float64), [x, y, 1.0]) * depth
        pose = truth.extrinsics[view].astype(np.float64)
        ends.append(pose[:, :3].T @ (camera - pose[:, 3]))
    meters = float(np.linalg.norm(ends[0] - ends[1]))
    anchors = Anchors(distance=[{"a": list(a), "b": list(b), "meters": meters}])
    _, report = fit_anchors(anchors, [], _off_by_scale(truth))
    assert _close(report["scale"], TRUE_SCALE) and report["observations"] == 1


def test_the_monocular_relative_model_gets_scale_and_shift_in_inverse_depth():
    truth = _truth()
    a, b = 0.8, 0.05  # 1/true = a / predicted + b  =>  predicted = a / (1/true - b)
    depth = (a / (1.0 / truth.depth[:1] - b)).astype(np.float32)
    mono = Prediction(depth, truth.confidence[:1], None, None, None, False, "relative")
    points = _points(truth, 0, 30, 4)
    points[3][2] *= 4.0  # one outlier
    fitted, report = fit_anchors(Anchors(points=points), [], mono)
    assert report["model"] == "inverse_depth_scale_shift" and report["outliers"] == 1
    assert _close(report["scale"], a) and abs(report["shift"] - b) < 1e-4
    np.testing.assert_allclose(fitted.depth, truth.depth[:1], rtol=TOLERANCE)
    with pytest.raises(ServiceError, match="distance anchors need a model"):
        fit_anchors(Anchors(distance=[{"a": [0, 1, 1], "b": [0, 5, 5], "meters": 1}]), [], mono)


def test_contradictory_or_misplaced_anchors_are_refused_with_a_reason():
    truth = _truth()
    points = _points(truth, 0, 10, 5)
    for i, point in enumerate(points):
        point[2] *= 1.0 + i  # no scale fits half of them
    with pytest.raises(ServiceError, match="disagree with the image") as error:
        fit_anchors(Anchors(points=points), [], _off_by_scale(truth))
    assert error.value.code == "invalid_input" and "points[0][" in error.value.message
    with pytest.raises(ServiceError, match=r"outside view 0's 64x48 image"):
        fit_anchors(Anchors(points=[[70.0, 5.0, 2.0]]), [], _off_by_scale(truth))
    with pytest.raises(ServiceError, match="has 2 view"):
        decode_anchor_maps(Anchors(sparse_depth=[{"view": 2, "base64": "AA=="}]), 2, 100)
    with pytest.raises(ServiceError, match=r"neither a PNG nor a \.npy"):
        decode_anchor_maps(Anchors(sparse_depth=[{"base64": "AAAA"}]), 2, 100)


def test_given_poses_fix_the_scale_and_anchors_are_only_checked():
    truth = _truth()
    posed = Prediction(truth.depth / 2, truth.confidence, truth.sky, truth.intrinsics,
                       truth.extrinsics, False, "pose_units")  # fmt: skip
    fitted, report = fit_anchors(Anchors(points=_points(truth, 0, 8, 6)), [], posed)
    assert fitted is posed and not report["fitted"] and report["scale"] == 1.0
    assert _close(report["suggested_scale"], 2.0)
    assert report["residual_m"]["p50"] > 0.5  # reported against the unscaled answer


# ---- through the service, with a real (random) da3-small ------------------------------


@pytest.fixture(scope="module")
def service(hf_cache, tmp_path_factory) -> Service:
    service = Service(offline_settings(hf_cache, tmp_path_factory.mktemp("workspace")))
    service.start()
    return service


def _ask(service: Service, **fields) -> dict:
    photo = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()
    photo_b = base64.b64encode((IMAGES / "soh-010.png").read_bytes()).decode()
    body = {"api_key": TEST_API_KEY, "images": [{"base64": photo}, {"base64": photo_b}],
            "process_res": 112, "outputs": ["depth_npy"], **fields}  # fmt: skip
    return service.handle(body)


def _depths(response: dict) -> np.ndarray:
    """Each view's depth_npy, inline or from the volume (big answers are stored)."""
    files = [v["depth_npy"] for v in response["views"]]
    data = [base64.b64decode(f["base64"]) if f.get("base64") else Path(f["path"]).read_bytes()
            for f in files]  # fmt: skip
    return np.stack([np.load(io.BytesIO(d)) for d in data])


def test_the_service_brings_a_relative_answer_to_the_anchors_metres(service):
    plain = _ask(service)
    depth = _depths(plain)
    pixels = [((10, 20), (300, 200)), ((50, 60),)]
    points = [[[x + 0.5, y + 0.5, 2.5 * float(depth[view][y, x])] for x, y in chosen]
              for view, chosen in enumerate(pixels)]  # fmt: skip
    anchored = _ask(service, anchors={"points": points})
    RunResponse.model_validate(anchored)
    assert plain["units"] == "relative" and anchored["units"] == "m" and anchored["is_metric"]
    assert abs(anchored["anchors"]["scale"] / 2.5 - 1) < 1e-5
    np.testing.assert_allclose(_depths(anchored), 2.5 * depth, rtol=1e-5)
    for before, after in zip(plain["views"], anchored["views"], strict=True):
        moved = np.asarray(after["extrinsics"])[:, 3]
        np.testing.assert_allclose(moved, 2.5 * np.asarray(before["extrinsics"])[:, 3], atol=1e-5)
    assert "anchors" in anchored["timings_ms"]
    assert plain["scale"] == {"source": "none"}
    assert anchored["scale"] == {"source": "anchors", "anchors_scale": anchored["anchors"]["scale"],
                                 "before_anchors": {"source": "none"}}  # fmt: skip


def test_the_service_refuses_bad_anchors_before_the_model_runs(service):
    with pytest.raises(ServiceError, match=r"sparse_depth\[0\] is neither a PNG"):
        _ask(service, anchors={"sparse_depth": [{"base64": "AAAA"}]})
    with pytest.raises(ServiceError) as error:
        _ask(service, anchors={"points": [[1, 2]]})
    assert "[x, y, depth_m]" in error.value.message
