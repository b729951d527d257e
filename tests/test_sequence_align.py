"""The sequence alignment core: Sim(3) fits, chunk plans, and the oracle test (a stand-in
network answering the true depth and cameras of a synthetic room in a random Sim(3) frame per
chunk; the assembled sequence equals the truth up to one global Sim(3))."""

from __future__ import annotations

import numpy as np
import pytest

from da3_serverless.sequence.align import Sim3, robust_sim3, umeyama
from da3_serverless.sequence.assemble import Assembler, world_points
from da3_serverless.sequence.plan import plan_chunks, windows
from sequence_scene import oracle_chunk, random_sim3, room_scene

TOLERANCE = 1e-4


def test_umeyama_recovers_a_similarity_exactly():
    rng = np.random.default_rng(1)
    truth = random_sim3(rng)
    source = rng.normal(size=(200, 3))
    fitted = umeyama(source, truth.apply(source), rng.uniform(0.5, 2, 200))
    assert fitted.scale == pytest.approx(truth.scale, rel=1e-10)
    np.testing.assert_allclose(fitted.rotation, truth.rotation, atol=1e-10)
    np.testing.assert_allclose(fitted.translation, truth.translation, atol=1e-9)


def test_robust_fit_ignores_gross_outliers():
    rng = np.random.default_rng(2)
    truth = random_sim3(rng)
    source = rng.normal(size=(2000, 3)) + np.array([0, 0, 8])
    target = truth.apply(source)
    bad = rng.choice(2000, 200, replace=False)  # 10 %, with high confidence
    target[bad] += rng.normal(scale=20, size=(200, 3))
    confidence = np.ones(2000)
    confidence[bad] = 5.0
    fit = robust_sim3(source, target, confidence)
    assert fit.transform.scale == pytest.approx(truth.scale, rel=1e-9)
    np.testing.assert_allclose(fit.transform.rotation, truth.rotation, atol=1e-9)
    assert fit.inliers == pytest.approx(0.9, abs=0.01)
    assert fit.residual < 1e-9


def test_sim3_composition_and_inverse():
    rng = np.random.default_rng(3)
    a, b = random_sim3(rng), random_sim3(rng)
    points = rng.normal(size=(10, 3))
    np.testing.assert_allclose(a.compose(b).apply(points), a.apply(b.apply(points)), atol=1e-9)
    np.testing.assert_allclose(a.inverse().apply(a.apply(points)), points, atol=1e-9)


@pytest.mark.parametrize(
    ("frames", "size", "overlap", "spans"),
    [
        (5, 8, None, [(0, 5)]),
        (10, 4, None, [(0, 4), (2, 6), (4, 8), (6, 10)]),
        (11, 4, 1, [(0, 4), (3, 7), (6, 10), (9, 11)]),
        (7, 5, 3, [(0, 5), (2, 7)]),
    ],
)
def test_chunk_plans_cover_every_frame_once(frames, size, overlap, spans):
    chunks = plan_chunks(frames, size, overlap)
    assert [(c.start, c.stop) for c in chunks] == spans
    owned = [frame for chunk in chunks for frame in chunk.owned]
    assert owned == list(range(frames))


@pytest.mark.parametrize(
    ("frames", "size", "overlap"),
    [(1, 4, 2), (4, 4, 2), (5, 4, 2), (6, 4, 2), (7, 4, 2), (30, 8, 3)],
)
def test_windows_over_a_stream_are_the_planned_chunks(frames, size, overlap):
    expected = plan_chunks(frames, size, overlap)
    got = list(windows(iter(range(frames)), size, overlap))
    assert [chunk for chunk, _ in got] == expected
    assert [items for _, items in got] == [list(range(c.start, c.stop)) for c in expected]


@pytest.mark.parametrize(("size", "overlap"), [(4, 0), (4, 4), (0, None)])
def test_chunk_plans_refuse_sizes_that_cannot_progress(size, overlap):
    with pytest.raises(ValueError, match=r"overlap|chunk_size"):
        plan_chunks(10, size, overlap)


def _assemble(scene, chunk_size, overlap, seed, outliers=0.0):
    rng = np.random.default_rng(seed)
    chunks = plan_chunks(len(scene), chunk_size, overlap)
    assembler = Assembler(chunks[1].overlap if len(chunks) > 1 else 1)
    depth, extrinsics, fits = [], [], []
    for chunk in chunks:
        frames = oracle_chunk(scene, range(chunk.start, chunk.stop), random_sim3(rng), rng)
        if outliers and chunk.overlap:
            head = frames.depth[: chunk.overlap]
            bad = rng.random(head.shape) < outliers
            head[bad] *= rng.uniform(2.0, 5.0, size=int(bad.sum()))
            frames.confidence[: chunk.overlap][bad] = 10.0
        aligned = assembler.add(chunk, frames)
        assert list(aligned.frames) == list(chunk.owned)
        depth.append(aligned.outputs.depth)
        extrinsics.append(aligned.outputs.extrinsics)
        fits.append(aligned)
    return np.concatenate(depth), np.concatenate(extrinsics), fits


def _centres(extrinsics):
    rotation = extrinsics[:, :, :3].astype(np.float64)
    return -np.einsum("nji,nj->ni", rotation, extrinsics[:, :, 3].astype(np.float64))


def _check_equal_up_to_one_sim3(scene, depth, extrinsics):
    """One Sim(3) (fitted on the camera centres) takes the assembled sequence onto the
    truth: centres, orientations and every depth within TOLERANCE (relative to the room)."""
    global_fit = umeyama(_centres(extrinsics), _centres(scene.extrinsics), np.ones(len(scene)))
    moved = global_fit.move_extrinsics(extrinsics)
    room = np.ptp(_centres(scene.extrinsics), axis=0).max()
    np.testing.assert_allclose(_centres(moved), _centres(scene.extrinsics), atol=TOLERANCE * room)
    np.testing.assert_allclose(moved[:, :, :3], scene.extrinsics[:, :, :3], atol=TOLERANCE)
    np.testing.assert_allclose(depth * global_fit.scale, scene.depth, rtol=TOLERANCE)


@pytest.mark.parametrize(("chunk_size", "overlap"), [(8, None), (10, 3), (6, 1)])
def test_oracle_chunks_assemble_to_the_truth_up_to_one_sim3(chunk_size, overlap):
    scene = room_scene(37)
    depth, extrinsics, fits = _assemble(scene, chunk_size, overlap, seed=chunk_size)
    assert len(depth) == len(scene)
    _check_equal_up_to_one_sim3(scene, depth, extrinsics)
    assert all(fit.residual < 1e-6 and fit.inliers == 1.0 for fit in fits)


def test_outliers_in_the_overlap_do_not_move_the_fit():
    scene = room_scene(37)
    depth, extrinsics, fits = _assemble(scene, 8, None, seed=5, outliers=0.08)
    _check_equal_up_to_one_sim3(scene, depth, extrinsics)
    assert all(0.85 < fit.inliers < 0.97 for fit in fits[1:])


def test_world_points_lift_pixels_through_the_cameras():
    scene = room_scene(3)
    frames = oracle_chunk(scene, range(3), Sim3.identity(), np.random.default_rng(0))
    points, depths = world_points(frames)
    # Projecting the points back through frame 1's camera gives its own pixels' depths.
    rotation, translation = scene.extrinsics[1, :, :3], scene.extrinsics[1, :, 3]
    count = scene.depth[0].size
    camera = points[count : 2 * count] @ rotation.T + translation
    np.testing.assert_allclose(camera[:, 2], scene.depth[1].reshape(-1), rtol=1e-9)
    np.testing.assert_allclose(depths[:count], scene.depth[0].reshape(-1))
