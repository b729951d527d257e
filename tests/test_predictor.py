"""The Predictor: real photos through the real loading path, checked against the reference
network on the same weights plus the documented pre/post-processing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import random_checkpoint
from da3_serverless.inference.cameras import relative_to_first_view
from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import MAX_PROCESS_RES, load_rgb, processing_size
from da3_serverless.inference.preprocess import to_network_input as network_input
from paths import IMAGES
from reference import load_reference

PHOTOS = [IMAGES / "soh-000.png", IMAGES / "soh-010.png"]
RES = 140


@pytest.fixture(scope="module")
def small(small_snapshot) -> Predictor:
    return Predictor.from_pretrained(small_snapshot, device="cpu")


@pytest.fixture(scope="module")
def small_reference(small_snapshot):
    return load_reference("da3-small", small_snapshot)


def reference_outputs(reference, paths, res=RES, **kwargs):
    views = [load_rgb(path)[0] for path in paths]
    batch = network_input(views, processing_size(*views[0].size, res))
    with torch.no_grad():
        return reference.model(batch, export_feat_layers=[], **kwargs)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> (N, H, W) bilinear, as the predictor documents."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear")[:, 0].numpy()


def test_predict_matches_reference_at_input_resolution(small, small_reference):
    prediction = small.predict(PHOTOS, process_res=RES)
    expected = reference_outputs(small_reference, PHOTOS)
    height, width = 680, 1208
    assert prediction.depth.shape == (2, height, width) and prediction.depth.dtype == np.float32
    np.testing.assert_allclose(
        prediction.depth, upsample(expected["depth"][0], (height, width)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        prediction.confidence,
        upsample(expected["depth_conf"][0], (height, width)),
        rtol=1e-4,
        atol=1e-5,
    )
    # The same cameras, expressed in the first view's camera frame (our world frame).
    reference_poses = relative_to_first_view(expected["extrinsics"][0, :, :3].double().numpy())
    np.testing.assert_allclose(prediction.extrinsics, reference_poses, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(prediction.extrinsics[0], np.eye(4)[:3])
    # Intrinsics come back in pixels of the input image.
    net_width, net_height = processing_size(width, height, RES)
    intrinsics = expected["intrinsics"][0].numpy().astype(np.float64)
    intrinsics[:, 0] *= width / net_width
    intrinsics[:, 1] *= height / net_height
    np.testing.assert_allclose(prediction.intrinsics, intrinsics, rtol=1e-4)
    assert prediction.sky is None and not prediction.is_metric and prediction.units == "relative"


def test_inputs_as_pil_array_and_path_agree(small):
    pil = Image.open(PHOTOS[0])
    array = np.asarray(pil.convert("RGB"))
    by_path = small.predict(PHOTOS[0], process_res=RES).depth
    np.testing.assert_array_equal(small.predict(pil, process_res=RES).depth, by_path)
    np.testing.assert_array_equal(small.predict([array], process_res=RES).depth, by_path)


def test_views_of_different_sizes_come_back_at_their_own_size(small):
    other = Image.open(PHOTOS[1]).convert("RGB").resize((600, 400))
    prediction = small.predict([PHOTOS[0], other], process_res=RES)
    assert prediction.depth[0].shape == (680, 1208)
    assert prediction.depth[1].shape == (400, 600)


def test_ray_pose_is_repeatable_and_matches_reference(small, small_reference):
    first = small.predict(PHOTOS, process_res=RES, use_ray_pose=True)
    second = small.predict(PHOTOS, process_res=RES, use_ray_pose=True)
    np.testing.assert_array_equal(first.extrinsics, second.extrinsics)
    torch.manual_seed(0)  # the reference samples from the global generator
    expected = reference_outputs(small_reference, PHOTOS, use_ray_pose=True)
    reference_poses = relative_to_first_view(expected["extrinsics"][0, :, :3].double().numpy())
    np.testing.assert_allclose(first.extrinsics, reference_poses, rtol=1e-4, atol=1e-4)


def test_pose_conditioned_input_returns_the_given_cameras(small):
    intrinsics = np.array([[1000.0, 0, 604], [0, 1000.0, 340], [0, 0, 1]])
    extrinsics = np.stack([np.eye(4)[:3], np.eye(4)[:3]])
    extrinsics[1, 0, 3] = 2.0  # second camera 2 m to the side
    prediction = small.predict(
        PHOTOS, process_res=RES, intrinsics=intrinsics, extrinsics=extrinsics
    )
    np.testing.assert_allclose(prediction.extrinsics, extrinsics)
    np.testing.assert_allclose(prediction.intrinsics, np.stack([intrinsics] * 2))
    assert np.isfinite(prediction.depth).all() and (prediction.depth > 0).all()
    # The depth is in the poses' units, which the service cannot know to be meters.
    assert prediction.units == "pose_units" and not prediction.is_metric
    assert prediction.scale["source"] == "poses" and prediction.scale["pose_scale"] > 0


def test_normalised_extrinsics_match_the_reference(small_reference):
    from da3_serverless.inference.cameras import normalise_extrinsics

    rng = np.random.default_rng(3)
    extrinsics = np.tile(np.eye(4), (3, 1, 1))
    extrinsics[:, :3, 3] = rng.normal(size=(3, 3))
    expected = small_reference._normalize_extrinsics(torch.tensor(extrinsics[None]).float())
    np.testing.assert_allclose(normalise_extrinsics(extrinsics), expected[0].numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        ([], {}, "images is empty"),
        ([np.zeros((8, 8), np.uint8)], {}, "HxWx3 uint8"),
        ([np.zeros((8, 8, 3), np.float64)], {}, "HxWx3 uint8"),
        (["/nonexistent.jpg"], {}, "cannot read"),
        (PHOTOS[:1], {"process_res": 13}, "between 14 and"),
        (PHOTOS[:1], {"process_res": MAX_PROCESS_RES + 14}, "between 14 and"),
        (PHOTOS, {"intrinsics": np.stack([np.eye(3)] * 3)}, "3 matrices for 2 views"),
        (PHOTOS, {"extrinsics": np.stack([np.eye(4)] * 2)}, "need intrinsics too"),
        (PHOTOS[:1], {"intrinsics": np.eye(4)}, "expected (1, 3, 3)"),
    ],
)
def test_bad_input_says_what_to_fix(small, images, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        small.predict(images, **kwargs)


@pytest.fixture(scope="module")
def metric_large(tmp_path_factory) -> Predictor:
    with random_checkpoint(tmp_path_factory, "da3metric-large", seed=1) as folder:
        return Predictor.from_pretrained(folder, device="cpu")


@pytest.mark.slow
def test_metric_large_scales_by_focal_over_300(metric_large, tmp_path):
    relative = metric_large.predict(PHOTOS[0], process_res=RES, metric=False)
    assert not relative.is_metric and relative.units == "relative"
    metric = metric_large.predict(PHOTOS[0], process_res=RES, focal_length_px=1208.0)
    assert metric.is_metric and metric.units == "m"
    net_width, net_height = processing_size(1208, 680, RES)
    focal_net = 1208.0 * (net_width / 1208 + net_height / 680) / 2
    np.testing.assert_allclose(metric.depth, relative.depth * focal_net / 300, rtol=1e-5)
    # the same focal through intrinsics, and through EXIF (35 mm equivalent: 36 mm = long side)
    intrinsics = np.array([[1208.0, 0, 604], [0, 1208.0, 340], [0, 0, 1]])
    by_intrinsics = metric_large.predict(PHOTOS[0], process_res=RES, intrinsics=intrinsics)
    np.testing.assert_allclose(by_intrinsics.depth, metric.depth, rtol=1e-5)
    expected = {"source": "focal_length", "focal_length_px": [1208.0],
                "focal_from": "focal_length_px", "canonical_focal_px": 300.0}  # fmt: skip
    assert metric.scale == expected
    assert by_intrinsics.scale["focal_from"] == "intrinsics"
    assert relative.scale == {"source": "none"}
    photo = Image.open(PHOTOS[0]).convert("RGB")
    exif = photo.getexif()
    exif.get_ifd(0x8769)[0xA405] = 28  # 28 mm equivalent, over the 43.27 mm diagonal
    path = tmp_path / "with-exif.jpg"
    photo.save(path, exif=exif, quality=95)
    by_exif = metric_large.predict(path, process_res=RES)
    assert by_exif.is_metric
    assert by_exif.scale["focal_from"] == "exif"
    focal_exif = 28 * math.hypot(1208, 680) / math.hypot(36, 24)
    focal_exif_net = focal_exif * (net_width / 1208 + net_height / 680) / 2
    ratio = by_exif.depth / metric_large.predict(path, process_res=RES, metric=False).depth
    np.testing.assert_allclose(ratio, focal_exif_net / 300, rtol=1e-4)
    with pytest.raises(ValueError, match="focal_length_px"):
        metric_large.predict(PHOTOS[0], process_res=RES)
    with pytest.raises(ValueError, match="predicts cameras"):
        metric_large.predict(PHOTOS[0], process_res=RES, use_ray_pose=True, metric=False)
