"""Batching unrelated photos through one forward: each batch sample's head maps are computed
apart and it is post-processed on its own (sky fill, metric alignment, ray pose with one seeded
generator each), so a photo's answer does not depend on its batch-mates, and
`Predictor.predict_batch` equals `predict` one by one. Other kernels and thread counts:
tests/test_batch_invariance.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from batch_photos import RES, ROTATED, ROTATED_UPRIGHT_SIZE, write_batch_photos
from conftest import random_checkpoint
from da3_serverless.inference.cancel import Cancelled, CancelToken
from da3_serverless.inference.prediction import Prediction
from da3_serverless.inference.predictor import Predictor, PredictRequest
from da3_serverless.inference.preprocess import load_rgb, processing_size
from da3_serverless.model.alignment import align_to_metric, mono_sky_fill
from da3_serverless.model.checkpoint import write_random_checkpoint
from da3_serverless.model.dpt import DPT
from da3_serverless.model.net import DepthAnything3Net, NestedDepthAnything3Net
from da3_serverless.model.rays import camera_from_rays
from da3_serverless.model.rng import per_sample_generators, seeded_generator
from da3_serverless.model.vit import DinoV2

FIELDS = ("depth", "confidence", "sky", "intrinsics", "extrinsics")


# ---- the model's post-processing, per sample ------------------------------------------------


def scene(seed: int, far: float, sky_rows: int) -> dict[str, torch.Tensor]:
    """Nested-model outputs of one 1-view scene of 340 x 300 (over 100000 non-sky pixels, where
    the reference would sample its quantiles), metric depth `far` times as deep as relative."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 1, 340, 300)
    depth = (0.5 * torch.randn(shape, generator=gen)).exp() * 3
    sky = 0.25 * torch.rand(shape, generator=gen)
    sky[..., :sky_rows, :] += 0.5
    intrinsics = torch.tensor([[[[260.0, 0, 150], [0, 260, 170], [0, 0, 1]]]])
    extrinsics = torch.eye(4)[:3].repeat(1, 1, 1, 1)
    extrinsics[..., :, 3] = torch.randn(3, generator=gen)
    return {
        "depth": depth,
        "depth_conf": 1 + torch.randn(shape, generator=gen).exp(),
        "extrinsics": extrinsics,
        "intrinsics": intrinsics,
        "metric_depth": depth * far * (300 / 260) * (1 + 0.05 * torch.rand(shape, generator=gen)),
        "metric_sky": sky,
    }


def batched(*scenes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([s[key] for s in scenes]) for key in scenes[0]}


def test_metric_alignment_fits_one_scale_per_sample():
    near, far, no_sky = scene(1, 0.8, 40), scene(2, 25.0, 60), scene(3, 2.0, 0)
    together = align_to_metric(**batched(near, far, no_sky))
    assert together.scale.shape == (3,)
    for index, alone in enumerate([near, far, no_sky]):
        single = align_to_metric(**alone)
        assert torch.equal(together.depth[index], single.depth[0])
        assert torch.equal(together.depth_conf[index], single.depth_conf[0])
        assert torch.equal(together.extrinsics[index], single.extrinsics[0])
        assert together.scale[index] == single.scale_factor
    assert 0.75 < together.scale[0] < 0.85 and 23 < together.scale[1] < 27
    # The far scene's sky is capped at 200 m; the near one's is its own 99th percentile.
    assert together.depth[1, 0, 0, 0] == 200.0 and together.depth[0, 0, 0, 0] < 200.0
    with pytest.raises(ValueError, match="read `scale`"):
        _ = together.scale_factor


def test_mono_sky_fill_takes_each_samples_own_quantile():
    one, two, clear = scene(4, 1.0, 50), scene(5, 1.0, 80), scene(6, 1.0, 0)
    depth = torch.cat([one["depth"], 10 * two["depth"], clear["depth"]])
    sky = torch.cat([one["metric_sky"], two["metric_sky"], clear["metric_sky"]])
    together = mono_sky_fill(depth, sky)
    for index in range(3):
        alone = mono_sky_fill(depth[index : index + 1], sky[index : index + 1])
        assert torch.equal(together[index], alone[0])
    assert torch.equal(together[2], depth[2])  # no sky: left as it is
    assert together[1, 0, 0, 0] > 5 * together[0, 0, 0, 0]  # 10x deeper scene, its own sky
    clear_twice = torch.cat([depth[2:]] * 2)
    assert mono_sky_fill(clear_twice, torch.cat([sky[2:]] * 2)) is clear_twice


def test_ray_pose_samples_with_one_generator_per_sample():
    gen = torch.Generator().manual_seed(7)
    ray = torch.randn(3, 1, 6, 8, 6, generator=gen)
    ray[..., 2] = 1 + ray[..., 2].abs()
    conf = 1 + torch.rand(3, 1, 6, 8, generator=gen)
    together = camera_from_rays(ray, conf)
    for index in range(3):
        alone = camera_from_rays(ray[index : index + 1], conf[index : index + 1])
        for got, expected in zip(together, alone, strict=True):
            assert torch.equal(got[index], expected[0])
    # Its batch-mates do not change a sample's draws: the same ray map twice, twice the answer.
    twice = camera_from_rays(ray[:1].expand(2, -1, -1, -1, -1), conf[:1].expand(2, -1, -1, -1))
    assert all(torch.equal(part[0], part[1]) for part in twice)


def test_one_generator_per_sample_is_checked():
    assert len(per_sample_generators(None, 3, "cpu")) == 3
    single = seeded_generator("cpu")
    assert per_sample_generators(single, 1, "cpu") == [single]
    with pytest.raises(ValueError, match="one per sample"):
        per_sample_generators(single, 2, "cpu")


# ---- Predictor.predict_batch against predict, one by one ------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """The 8 batch photos, as paths, PIL images and an array (the rotated one as its file)."""
    paths = write_batch_photos(tmp_path_factory.mktemp("batch-photos"))
    photos = [
        path if index in (0, ROTATED) else Image.open(path).convert("RGB")
        for index, path in enumerate(paths)
    ]
    photos[3] = np.asarray(photos[3])
    sizes = {load_rgb(photo)[0].size for photo in photos}
    assert len(sizes) == 8 and ROTATED_UPRIGHT_SIZE in sizes  # all different; one turned upright
    assert {processing_size(*size, RES) for size in sizes} == {(RES, 70)}
    return photos


class ForwardLog(torch.nn.Module):
    """The network, recording the batch size of every forward."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.batches: list[int] = []

    @property
    def has_gaussians(self) -> bool:
        return getattr(self.network, "has_gaussians", False)

    def forward(self, images, *args, **kwargs):
        self.batches.append(images.shape[0])
        return self.network(images, *args, **kwargs)


@contextlib.contextmanager
def forwards_of(predictor: Predictor) -> Iterator[list[int]]:
    """The batch sizes of the predictor's forwards while in the block."""
    logged = ForwardLog(predictor.network)
    predictor.network = logged
    try:
        yield logged.batches
    finally:
        predictor.network = logged.network


def assert_same(got: Prediction, expected: Prediction, rtol: float = 1e-5) -> None:
    """Every output within `rtol` relative, entries near zero relative to their array's
    largest magnitude (as the parity tests compare)."""
    assert (got.is_metric, got.units) == (expected.is_metric, expected.units)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        for view_a, view_b in zip(a, b, strict=True):  # views may differ in size
            scale = float(np.abs(view_b).max())
            np.testing.assert_allclose(view_a, view_b, rtol=rtol, atol=rtol * scale, err_msg=name)


def batch_against_one_by_one(predictor: Predictor, photos, rtol: float = 1e-5, **kwargs) -> None:
    with forwards_of(predictor) as batches:
        together = predictor.predict_batch(
            [PredictRequest(photo, process_res=RES, **kwargs) for photo in photos]
        )
        assert batches == [8]
        for photo, got in zip(photos, together, strict=True):
            expected = predictor.predict(photo, process_res=RES, **kwargs)
            assert got.depth.shape == expected.depth.shape
            assert_same(got, expected, rtol)
        assert batches == [8] + [1] * 8


@pytest.fixture(scope="module")
def small(small_snapshot) -> Predictor:
    return Predictor.from_pretrained(small_snapshot, device="cpu")


@pytest.mark.slow  # over 30 s on two busy cores
def test_small_batch_of_8_equals_one_by_one(small, photos):
    batch_against_one_by_one(small, photos)


@pytest.mark.slow  # over 30 s on two busy cores
def test_small_batch_of_8_with_ray_pose_equals_one_by_one(small, photos):
    batch_against_one_by_one(small, photos, use_ray_pose=True)


@pytest.mark.slow  # a 1.4 GB random checkpoint to write and load
def test_mono_large_batch_of_8_equals_one_by_one(photos, tmp_path_factory):
    with random_checkpoint(tmp_path_factory, "da3mono-large", seed=2) as folder:
        predictor = Predictor.from_pretrained(folder, device="cpu")
    batch_against_one_by_one(predictor, photos)


@pytest.mark.slow
def test_nested_batch_of_8_equals_one_by_one(photos, tmp_path_factory):
    with random_checkpoint(tmp_path_factory, "da3nested-giant-large", seed=3) as folder:
        predictor = Predictor.from_pretrained(folder, device="cpu")
    batch_against_one_by_one(predictor, photos)


@pytest.mark.slow  # over 30 s on two busy cores
def test_what_cannot_share_a_forward_runs_alone(small, photos):
    two_views = PredictRequest([photos[0], photos[1]], process_res=RES)
    posed = PredictRequest(
        photos[2], process_res=RES, intrinsics=np.diag([600.0, 600.0, 1.0]), extrinsics=np.eye(4)
    )
    intrinsics_only = PredictRequest(
        photos[3], process_res=RES, intrinsics=np.array([[900.0, 0, 500], [0, 900, 280], [0, 0, 1]])
    )
    requests = [
        PredictRequest(photos[0], process_res=RES),
        two_views,
        PredictRequest(photos[1], process_res=RES, use_ray_pose=True),  # other flags
        PredictRequest(photos[4], process_res=2 * RES),  # other network size
        posed,
        intrinsics_only,  # never enters the network: batches
        PredictRequest(photos[5], process_res=RES),
        PredictRequest(photos[6], process_res=13),  # bad argument: its own error
        PredictRequest(photos[7], process_res=RES),
    ]
    with forwards_of(small) as batches:
        results = small.predict_batch(requests, max_batch=3, return_exceptions=True)
    # In order of first members: [0, 5, 6], two views, ray pose, 2x res, poses, [8].
    assert batches == [3, 1, 1, 1, 1, 1]
    assert isinstance(results[7], ValueError) and "process_res" in str(results[7])
    for request, result in zip(requests, results, strict=True):
        if request.process_res != 13:
            assert_same(result, small.predict(**vars(request)))
    with pytest.raises(ValueError, match="process_res"):
        small.predict_batch(requests)


class OutOfMemoryPastOne(torch.nn.Module):
    """The network, running out of GPU memory for batches of more than `fits` samples (as a
    GPU does past its memory); injected, since CPUs raise no such error."""

    def __init__(self, network: torch.nn.Module, fits: int):
        super().__init__()
        self.network, self.fits = network, fits

    def forward(self, images, *args, **kwargs):
        if images.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return self.network(images, *args, **kwargs)


def test_a_batch_out_of_gpu_memory_runs_again_one_by_one(small, photos):
    requests = [PredictRequest(photo, process_res=RES) for photo in photos[:3]]
    expected = [small.predict(photo, process_res=RES) for photo in photos[:3]]
    network = small.network
    small.network = OutOfMemoryPastOne(network, fits=1)
    try:
        recovered = small.predict_batch(requests)
        small.network.fits = 0  # not even one fits: each request gets the error
        failed = small.predict_batch(requests, return_exceptions=True)
    finally:
        small.network = network
    for got, alone in zip(recovered, expected, strict=True):
        assert_same(got, alone, rtol=0)
    assert all(isinstance(error, torch.cuda.OutOfMemoryError) for error in failed)


def test_one_samples_failure_after_the_forward_fails_only_that_sample(small, photos, monkeypatch):
    """A sample whose post-processing fails (say, out of memory resizing its maps to a large
    input) gets its own error; its batch-mates of the same forward get their answers."""
    requests = [PredictRequest(photo, process_res=RES) for photo in photos[:3]]
    expected = [small.predict(photo, process_res=RES) for photo in photos[:3]]
    finish = Predictor._finish

    def failing_second(self, prepared, output, sample):
        if sample == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return finish(self, prepared, output, sample)

    monkeypatch.setattr(Predictor, "_finish", failing_second)
    with forwards_of(small) as forwards:
        got = small.predict_batch(requests, return_exceptions=True)
    assert forwards == [3]
    assert isinstance(got[1], torch.cuda.OutOfMemoryError) and got[1].__traceback__ is None
    assert_same(got[0], expected[0])
    assert_same(got[2], expected[2])


def test_per_request_cancel_flags(small, photos):
    """One token per request: a request cancelled before its forward never runs (its error is
    `Cancelled` with its reason); the forward of the others runs, and stops at its next check
    only once all of them are cancelled."""
    requests = [PredictRequest(photo, process_res=RES) for photo in photos[:3]]
    tokens = [CancelToken() for _ in requests]
    tokens[1].cancel("cancelled while it waited")
    with forwards_of(small) as forwards:
        got = small.predict_batch(requests, return_exceptions=True, cancel=tokens)
    assert forwards == [2]
    assert isinstance(got[1], Cancelled) and "cancelled while it waited" in str(got[1])
    assert isinstance(got[0], Prediction) and isinstance(got[2], Prediction)
    for token in tokens:
        token.cancel()
    with forwards_of(small) as forwards:
        got = small.predict_batch(requests, return_exceptions=True, cancel=tokens)
    assert forwards == [] and all(isinstance(error, Cancelled) for error in got)
    with pytest.raises(ValueError, match="2 tokens for 3 requests"):
        small.predict_batch(requests, cancel=tokens[:2])


# ---- with the 3D-Gaussian branch: a forward flag, and the nested model's per-sample scale ----


@pytest.fixture(scope="module")
def gs_small(tmp_path_factory) -> Predictor:
    folder = tmp_path_factory.mktemp("da3-small-gs")
    return Predictor.from_pretrained(
        write_random_checkpoint("da3-small", folder, seed=0, gaussians=True), device="cpu"
    )


@pytest.mark.slow  # over 30 s on two busy cores
def test_gaussians_batch_apart_from_depth_only_and_equal_one_by_one(gs_small, photos):
    requests = [PredictRequest(photo, process_res=RES, gaussians=True) for photo in photos[:3]]
    requests.append(PredictRequest(photos[3], process_res=RES))  # another forward flag
    with forwards_of(gs_small) as batches:
        together = gs_small.predict_batch(requests)
    assert batches == [3, 1]
    for request, got in zip(requests, together, strict=True):
        expected = gs_small.predict(**vars(request))
        assert_same(got, expected)
        assert (got.gaussians is None) == (not request.gaussians)
        for name in ("means", "scales", "rotations", "opacities", "colors") * request.gaussians:
            want = getattr(expected.gaussians, name)
            np.testing.assert_allclose(
                getattr(got.gaussians, name), want, rtol=1e-5, atol=1e-5 * np.abs(want).max()
            )


def test_nested_gaussians_take_their_own_samples_scale(gs_small):
    with torch.random.fork_rng():  # a tiny metric branch, randomly initialised
        torch.manual_seed(0)
        backbone = DinoV2("vits", [5, 7, 9, 11], cat_token=False)
        head = DPT(384, features=64, out_channels=[48, 96, 192, 384])
        metric = DepthAnything3Net(backbone, head).eval()
    nested = NestedDepthAnything3Net(gs_small.network, metric)
    images = torch.randn(3, 1, 3, 42, 56, generator=torch.Generator().manual_seed(4))
    images *= torch.tensor([1.0, 3.0, 0.3])[:, None, None, None, None]
    with torch.inference_mode():
        together = nested(images, gaussians=True)
        alone = [nested(images[i : i + 1], gaussians=True) for i in range(3)]
    for index, single in enumerate(alone):
        for name in ("means", "scales"):
            torch.testing.assert_close(
                getattr(together.gaussians, name)[index], getattr(single.gaussians, name)[0]
            )
        torch.testing.assert_close(together.depth[index], single.depth[0])
