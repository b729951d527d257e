"""Pre-processing and camera helpers of the predictor, on real images and exact geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from da3_serverless.inference.cameras import (
    as_matrices,
    camera_centers,
    normalise_extrinsics,
    umeyama_scale,
)
from da3_serverless.inference.preprocess import (
    PATCH_SIZE,
    load_rgb,
    processing_size,
    to_network_input,
)
from paths import IMAGES


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_processing_size_keeps_aspect_on_the_patch_grid():
    assert processing_size(1208, 680, 504) == (504, 280)
    assert processing_size(680, 1208, 504) == (280, 504)
    width, height = processing_size(4000, 3000, 518)
    assert width % PATCH_SIZE == 0 and height % PATCH_SIZE == 0
    assert abs(width / height - 4 / 3) < 0.05
    assert processing_size(10, 3, 14) == (14, 14)  # at least one patch per side


def test_network_input_is_normalised_real_photo():
    image, _ = load_rgb(IMAGES / "soh-000.png")
    batch = to_network_input([image, image], processing_size(*image.size, 504))
    assert batch.shape == (1, 2, 3, 280, 504)
    # ImageNet normalisation: a real photo lands roughly in [-2.2, 2.7]
    assert -2.2 < batch.min() < 0 < batch.max() < 2.7


def test_load_rgb_applies_exif_orientation_and_reads_focal(tmp_path):
    image = Image.new("RGB", (60, 40), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    exif.get_ifd(0x8769)[0xA405] = 26  # 26 mm equivalent
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    loaded, focal = load_rgb(path)
    assert loaded.size == (40, 60)
    assert focal == pytest.approx(26 * math.hypot(60, 40) / math.hypot(36, 24))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4), np.uint8), "HxWx3 uint8"),
        (np.zeros((4, 4, 3), np.float32), "HxWx3 uint8"),
        ("/nonexistent/photo.jpg", "cannot read"),
        (42, "unsupported type"),
    ],
)
def test_load_rgb_refuses_bad_input_with_a_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        load_rgb(bad)


def test_umeyama_recovers_the_scale_of_a_similarity():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(6, 3))
    target = 2.5 * source @ random_rotation(rng).T + np.array([1.0, -2.0, 0.5])
    assert umeyama_scale(target, source) == pytest.approx(2.5)
    assert umeyama_scale(target[:1], source[:1]) == 1.0


def test_normalised_extrinsics_start_at_identity_with_unit_scale():
    rng = np.random.default_rng(1)
    extrinsics = np.tile(np.eye(4), (3, 1, 1))
    for view in range(3):
        extrinsics[view, :3, :3] = random_rotation(rng)
        extrinsics[view, :3, 3] = rng.normal(size=3) * 5
    normalised = normalise_extrinsics(extrinsics)
    np.testing.assert_allclose(normalised[0], np.eye(4), atol=1e-9)
    distances = np.sort(np.linalg.norm(camera_centers(normalised), axis=1))
    assert distances[1] == pytest.approx(1.0)  # the (lower) median camera distance


def test_as_matrices_broadcasts_one_and_names_the_problem():
    assert as_matrices(np.eye(3), (3, 3), 2, "intrinsics").shape == (2, 3, 3)
    with pytest.raises(ValueError, match="2 matrices for 3 views"):
        as_matrices(np.stack([np.eye(3)] * 2), (3, 3), 3, "intrinsics")
    with pytest.raises(ValueError, match="NaN"):
        as_matrices(np.full((3, 3), np.nan), (3, 3), 1, "intrinsics")
