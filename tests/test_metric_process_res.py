"""A metric answer at any `process_res`: oracle networks (tests/metric_oracle.py) answer a
known scene as perfect networks would, through the real `Predictor` (resizing to the network's
grid, the focal length carried into network pixels, the nested alignment, the maps resized
back to the photo). The answer must be the scene's true depth at every `process_res`, up to
the maps' resizing: so whatever moves a real model's metric answer with `process_res` is the
network itself, not the service (README, "Metric scale and process_res")."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import processing_size
from metric_oracle import MetricOracle, nested_oracle, true_depth

SIZES = [(1208, 680), (640, 480), (480, 640), (1000, 999)]
RESOLUTIONS = [140, 280, 504, 756, 1008]


def _check(depth: np.ndarray, size: tuple[int, int], process_res: int) -> None:
    """The depth equals the scene's: its median relative error within 1e-4 (float32: the nested
    fit sums up to a million pixels), and every pixel
    within the resizing's reach: the maps come back from the network's rows by bilinear
    interpolation, exact for a depth linear in the row except within half a network row of
    the top and bottom edges, where it is clamped (Z changes by 3 m over the image's height)."""
    width, height = size
    network_height = processing_size(width, height, process_res)[1]
    truth = true_depth(height, width).numpy()
    error = np.abs(depth.astype(np.float64) - truth)
    assert np.median(error / truth) < 1e-4
    assert error.max() <= 3.0 * 0.5 / network_height + 1e-4


@pytest.mark.parametrize("process_res", RESOLUTIONS)
@pytest.mark.parametrize("size", SIZES)
def test_the_metric_model_answers_the_same_at_every_process_res(size, process_res):
    focal = 0.8 * max(size)
    predictor = Predictor(MetricOracle(focal, size), "da3metric-large", device="cpu")
    photo = Image.new("RGB", size, (90, 120, 150))
    prediction = predictor.predict(photo, process_res=process_res, focal_length_px=focal)
    assert prediction.units == "m"
    assert prediction.scale["source"] == "focal_length"
    _check(prediction.depth[0], size, process_res)


@pytest.mark.parametrize("process_res", RESOLUTIONS)
def test_given_intrinsics_give_the_same_metric_answer(process_res):
    size = (1208, 680)
    focal = 950.0
    intrinsics = np.array([[focal, 0, 604], [0, focal, 340], [0, 0, 1]], np.float64)
    predictor = Predictor(MetricOracle(focal, size), "da3metric-large", device="cpu")
    photo = Image.new("RGB", size, (90, 120, 150))
    prediction = predictor.predict(photo, process_res=process_res, intrinsics=intrinsics[None])
    assert prediction.scale["focal_from"] == "intrinsics"
    _check(prediction.depth[0], size, process_res)


@pytest.mark.parametrize("process_res", RESOLUTIONS)
@pytest.mark.parametrize("size", SIZES)
def test_the_nested_alignment_answers_the_same_at_every_process_res(size, process_res):
    """The nested model and the Apache pairs (the same class): the metric network's depth is
    converted with the any-view network's predicted focal length, then the any-view depth is
    fitted to it; camera translations scale with it."""
    network = nested_oracle(0.8 * max(size), size)
    predictor = Predictor(network, "da3nested-giant-large", device="cpu")
    photo = Image.new("RGB", size, (90, 120, 150))
    prediction = predictor.predict(photo, process_res=process_res)
    assert prediction.units == "m"
    assert prediction.scale["source"] == "model"
    assert prediction.scale["nested_scale"] == pytest.approx(2.7, rel=1e-4)  # float32 sums
    _check(prediction.depth[0], size, process_res)
