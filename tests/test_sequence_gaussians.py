"""`gaussians_ply` of a sequence: each chunk's Gaussians of its owned frames moved into the
first chunk's frame by the chunk's Sim(3), filtered as the scene is, one PLY for the sequence.

The oracle: the synthetic room of tests/sequence_scene.py, answered per chunk in a random
Sim(3) frame with one Gaussian per pixel sitting on that pixel's depth point; moved by the
fitted chunk transform, every Gaussian lands on its pixel's aligned depth point (and so on the
truth, up to the one global Sim(3) of the first chunk's frame), its scales times the chunk's
scale, its rotation and spherical harmonics turned by the chunk's rotation. Then through the
real service with a random da3-small carrying the Gaussian head (offsets zeroed, so each
Gaussian sits on its cell's ray) on a synthetic video: read back with plyfile, every owned
frame's Gaussians once, on the rays of the trajectory's cameras."""

from __future__ import annotations

import base64
import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import TEST_API_KEY, offline_settings
from da3_serverless.api.budget import HOST_BYTES_PER_PIXEL, estimate_cost
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.job import JobInfo
from da3_serverless.api.schema import RunResponse, parse_request
from da3_serverless.exports.gaussians import FILE_BYTES_PER_GAUSSIAN
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.inference.gaussians import moved_gaussians
from da3_serverless.inference.prediction import Gaussians, Prediction
from da3_serverless.inference.preprocess import processing_size
from da3_serverless.model.spherical_harmonics import SH_C0, basis
from da3_serverless.sequence.assemble import Assembler, world_points
from da3_serverless.sequence.gaussians import GaussianCollector
from da3_serverless.sequence.plan import plan_chunks
from da3_serverless.sequence.share import HOLD
from da3_serverless.service import Service
from sequence_scene import HEIGHT, WIDTH, as_prediction, oracle_chunk, random_sim3, room_scene
from sequence_standin import check_chunk_price, files_left, standin_context
from test_gaussians_output import COMPACT, INRIA, read_gaussians, settings_for, xyz
from videos import constant_rate, make_video

# Relative to the scene's extent: float32 arithmetic of the frame change (about 1e-6).
TOLERANCE = 1e-4
EVERY = {"conf_percentile": 0, "keep_sky": True, "remove_edges": False, "max_points": 2_000_000}
FRAMES, CHUNK, OVERLAP = 10, 4, 2


def _quaternions(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    q = rng.normal(size=(*shape, 4))
    return (q / np.linalg.norm(q, axis=-1, keepdims=True)).astype(np.float32)


def _matrices(quaternions: np.ndarray) -> np.ndarray:
    """(w, x, y, z) quaternions -> rotation matrices."""
    flat = np.asarray(quaternions, np.float64).reshape(-1, 4)
    return Rotation.from_quat(flat[:, [1, 2, 3, 0]]).as_matrix()


def _colour(gaussians: Gaussians, directions: np.ndarray) -> np.ndarray:
    """Each Gaussian's SH colour (degrees 0..2) seen along its own direction: (M, 3)."""
    coefficients = np.concatenate(
        [((gaussians.colors - 0.5) / SH_C0)[..., None], gaussians.sh_rest], -1
    ).reshape(-1, 3, 9)
    values = basis(torch.from_numpy(directions)).numpy()  # (M, 9)
    return np.einsum("mcn,mn->mc", coefficients, values)


def _oracle_chunk_prediction(scene, chunk, frame, rng) -> Prediction:
    """A chunk in the Sim(3) `frame` of the truth, one Gaussian per pixel on its depth point."""
    frames = oracle_chunk(scene, range(chunk.start, chunk.stop), frame, rng)
    count = len(chunk)
    shape = (count, HEIGHT, WIDTH)
    means, _ = world_points(frames)
    gaussians = Gaussians(
        means=means.reshape(*shape, 3).astype(np.float32),
        scales=rng.uniform(0.01, 0.1, size=(*shape, 3)).astype(np.float32),
        rotations=_quaternions(rng, shape),
        opacities=rng.uniform(0.1, 0.9, size=shape).astype(np.float32),
        colors=rng.uniform(0, 1, size=(*shape, 3)).astype(np.float32),
        sh_rest=rng.normal(scale=0.2, size=(*shape, 3, 8)).astype(np.float32),
    )
    return as_prediction(frames, np.zeros(shape, np.float32), gaussians)


def test_a_chunks_gaussians_moved_by_its_sim3_sit_on_its_aligned_depth_points():
    rng = np.random.default_rng(7)
    scene = room_scene(FRAMES)
    assembler = Assembler(OVERLAP)
    for chunk in plan_chunks(FRAMES, CHUNK, OVERLAP):
        prediction = _oracle_chunk_prediction(scene, chunk, random_sim3(rng), rng)
        aligned = assembler.add(chunk, prediction)
        owned = slice(chunk.overlap, None)
        transform = aligned.transform
        before = Gaussians(
            **{k: getattr(prediction.gaussians, k)[owned] for k in vars(prediction.gaussians)}
        )
        moved = moved_gaussians(
            before, prediction.extrinsics[owned], aligned.outputs.extrinsics, 1 / transform.scale
        )
        points, _ = world_points(aligned.outputs)  # the aligned depth points, every pixel
        extent = np.abs(points).max()
        assert np.abs(moved.means.reshape(-1, 3) - points).max() < TOLERANCE * extent
        np.testing.assert_allclose(moved.scales, before.scales * transform.scale, rtol=1e-5)
        expected = transform.rotation @ _matrices(before.rotations)  # R composed after
        np.testing.assert_allclose(_matrices(moved.rotations), expected, atol=1e-5)
        np.testing.assert_array_equal(moved.opacities, before.opacities)
        # The colour seen along direction d before is the colour seen along R d after.
        directions = rng.normal(size=(moved.opacities.size, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        turned = directions @ transform.rotation.T
        np.testing.assert_allclose(_colour(moved, turned), _colour(before, directions), atol=1e-5)


def _request(**fields):
    return parse_request(
        {"video_base64": "AAAA", "outputs": ["trajectory", "gaussians_ply"], **fields}
    )


def test_the_collector_writes_each_owned_frame_once_on_the_truth():
    """Through the collector, read back with plyfile: every owned frame's Gaussians once (10
    frames, not the 16 forwarded), in frame order, on the true room seen in the first chunk's
    frame (the truth up to one global Sim(3))."""
    rng = np.random.default_rng(3)
    scene = room_scene(FRAMES)
    assembler = Assembler(OVERLAP)
    collector = GaussianCollector(_request(**EVERY))
    frames = [random_sim3(rng) for _ in plan_chunks(FRAMES, CHUNK, OVERLAP)]
    for chunk, frame in zip(plan_chunks(FRAMES, CHUNK, OVERLAP), frames, strict=True):
        prediction = _oracle_chunk_prediction(scene, chunk, frame, rng)
        collector.add(assembler.add(chunk, prediction), prediction)
    vertices, comments = read_gaussians(collector.write("relative"), INRIA)
    assert "units relative" in comments
    assert len(vertices) == collector.summary()["points"] == FRAMES * HEIGHT * WIDTH
    truth, _ = world_points(scene)  # every pixel of every frame, in (frame, row, col) order
    expected = frames[0].apply(truth)  # the first chunk's frame of the truth
    extent = np.abs(expected).max()
    assert np.abs(xyz(vertices) - expected).max() < TOLERANCE * extent
    assert collector.summary()["removed"] == dict.fromkeys(collector.removed, 0)


def test_the_collector_holds_a_bounded_count_however_long_the_sequence():
    """Memory bounded by max_points, not by the sequence's length: over 80 frames (39 chunks)
    at max_points 600, after every chunk the collector holds at most HOLD x max_points
    Gaussians (sequence/share.py; the first chunk alone keeps max_points, so it passes
    max_points and is thinned on the way), and the file holds max_points, evenly per frame
    (600 / 80: 8 for the first 40 frames, 7 for the others)."""
    rng = np.random.default_rng(5)
    frames, max_points = 80, 600
    scene = room_scene(frames)
    assembler = Assembler(OVERLAP)
    collector = GaussianCollector(_request(max_points=max_points))
    held = []
    for chunk in plan_chunks(frames, CHUNK, OVERLAP):
        prediction = _oracle_chunk_prediction(scene, chunk, random_sim3(rng), rng)
        collector.add(assembler.add(chunk, prediction), prediction)
        held.append(collector.kept.held)
    assert max_points < max(held) <= HOLD * max_points
    part = collector.kept.parts[0]
    per_gaussian = sum(values.nbytes for values in part.values()) / len(part["opacities"])
    assert per_gaussian == 4 * (3 + 3 + 4 + 1 + 3 + 3 * 8)  # float32, degrees 1-2 kept
    gaussians = collector.gaussians()
    frame = collector.kept.frames[0]
    assert np.bincount(frame, minlength=frames).tolist() == [8] * 40 + [7] * 40
    vertices, _ = read_gaussians(collector.write("relative"))
    assert len(vertices) == len(gaussians) == collector.summary()["points"] == max_points
    np.testing.assert_array_equal(xyz(vertices), gaussians.means)
    removed = collector.summary()["removed"]
    assert sum(removed.values()) + len(vertices) == frames * HEIGHT * WIDTH


# ---- through the service: a random da3-small with the Gaussian head, a synthetic video ------

PROCESS_RES = 56
VIDEO_W, VIDEO_H = 64, 48
GRID_W, GRID_H = processing_size(VIDEO_W, VIDEO_H, PROCESS_RES)
CELLS = GRID_W * GRID_H


@pytest.fixture(scope="module")
def gs_service(still_snapshot, tmp_path_factory) -> Service:
    workspace = tmp_path_factory.mktemp("workspace")
    return Service(settings_for(still_snapshot, workspace))


@pytest.fixture(scope="module")
def video() -> bytes:
    return make_video(constant_rate(2.0, 30), width=VIDEO_W, height=VIDEO_H)


def _video_request(video: bytes, **fields) -> dict:
    return {
        "api_key": TEST_API_KEY, "video_base64": base64.b64encode(video).decode(), "fps": 5,
        "chunk_size": CHUNK, "overlap": OVERLAP, "process_res": PROCESS_RES,
        "output_metric": False, "outputs": ["trajectory", "gaussians_ply"], **fields,
    }  # fmt: skip


def test_a_videos_gaussians_sit_on_their_frames_cell_rays_once(gs_service, video):
    """Every owned frame's Gaussians once (10 frames of 16 forwarded), in frame order, each on
    the ray through its grid cell's centre of its frame's camera in the trajectory (the first
    chunk's frame): chunks moved by their Sim(3), no overlap frame doubled."""
    response = gs_service.handle(_video_request(video, **EVERY))
    RunResponse.model_validate(response)
    vertices, comments = read_gaussians(base64.b64decode(response["gaussians_ply"]["base64"]))
    assert "units relative" in comments
    summary = response["gaussians"]
    assert len(vertices) == summary["points"] == FRAMES * CELLS
    assert set(summary["removed"].values()) == {0}
    archive = zipfile.ZipFile(io.BytesIO(base64.b64decode(response["trajectory"]["base64"])))
    cameras = json.loads(archive.read("cameras.json"))["frames"]
    assert len(cameras) == FRAMES
    means = xyz(vertices).reshape(FRAMES, GRID_H, GRID_W, 3)
    centre_x = (np.arange(GRID_W) + 0.5) * VIDEO_W / GRID_W
    centre_y = (np.arange(GRID_H) + 0.5) * VIDEO_H / GRID_H
    for frame, camera in zip(means, cameras, strict=True):
        pose = np.asarray(camera["extrinsics"], np.float64)
        projected = (frame @ pose[:, :3].T + pose[:, 3]) @ np.asarray(camera["intrinsics"]).T
        assert (projected[..., 2] > 0).all()
        # float32 rounding only: a chunk in the wrong frame lands many pixels off its ray
        assert np.abs(projected[..., 0] / projected[..., 2] - centre_x[None, :]).max() < 0.02
        assert np.abs(projected[..., 1] / projected[..., 2] - centre_y[:, None]).max() < 0.02


def test_a_videos_gaussians_are_filtered_and_capped_at_max_points(gs_service, video):
    response = gs_service.handle(
        _video_request(video, max_points=500, gaussians_compact=True, return_base64=False)
    )
    entry = response["gaussians_ply"]
    with open(entry["path"], "rb") as file:
        vertices, _ = read_gaussians(file.read(), COMPACT)
    summary = response["gaussians"]
    assert 0 < len(vertices) == summary["points"] <= 500
    assert sum(summary["removed"].values()) + summary["points"] == FRAMES * CELLS
    assert summary["removed"]["voxel"] > 0
    assert np.isfinite(xyz(vertices)).all()


def test_cancel_after_a_chunk_with_gaussians_leaves_no_file(still_snapshot, tmp_path, video):
    service = Service(settings_for(still_snapshot, tmp_path))
    token = CancelToken()
    with pytest.raises(ServiceError) as caught:
        service.handle(
            _video_request(video), cancel=token,
            job=JobInfo(progress=lambda summary: token.cancel("cancelled by the test")),
        )  # fmt: skip
    assert caught.value.code == "cancelled"
    assert not files_left(service.settings)


def test_gaussians_of_a_sequence_need_the_head(hf_cache, tmp_path, video):
    """da3-small's release has no Gaussian head: refused before any frame is decoded."""
    service = Service(offline_settings(hf_cache, tmp_path))
    with pytest.raises(ServiceError, match="no 3D-Gaussian head") as caught:
        service.handle(_video_request(video))
    assert caught.value.code == "invalid_input"
    assert not files_left(service.settings)


@pytest.mark.parametrize("max_points", [3000, 20_000])
def test_a_chunk_is_priced_with_its_gaussians(tmp_path, video, max_points):
    """The budget prices a sequence per chunk, and a chunk with its Gaussians as a single
    request of its frames with gaussians_ply, its file holding up to max_points of every planned
    frame's cells (3000: fewer than a chunk's 4 x CELLS; 20,000: more, past one chunk's). A
    budget one pixel short refuses the request before any frame is predicted, naming
    gaussians_ply; the exact price passes the budget (and stops at the cancel after it)."""
    frames = [(VIDEO_W, VIDEO_H)] * CHUNK
    chunk = estimate_cost("stand-in", PROCESS_RES, frames, None, max_points)
    written = min(max_points, FRAMES * CELLS) - min(max_points, CHUNK * CELLS)
    price = chunk.host_pixels + math.ceil(written * FILE_BYTES_PER_GAUSSIAN / HOST_BYTES_PER_PIXEL)
    assert chunk.host_pixels > estimate_cost("stand-in", PROCESS_RES, frames).host_pixels
    assert (price > chunk.host_pixels) == (max_points > CHUNK * CELLS)
    fields = {"max_points": max_points, "api_key": None}
    request = parse_request(_video_request(video, **fields))
    trajectory = parse_request(_video_request(video, **fields, outputs=["trajectory"]))
    context = standin_context(offline_settings(None, tmp_path))
    check_chunk_price(context, trajectory, request, price, CHUNK, "gaussians_ply")
