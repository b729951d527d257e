"""A sequence's scene holds up to `max_points` spread evenly over its frames, whatever the
planned frame count (`sequence/share.py`): a video stream that declares no duration plans
MAX_VIDEO_FRAMES (2000) frames, and used to give a 30-frame stream's scene 30 / 2000 of
`max_points`. What the collectors hold stays bounded by a few times `max_points` however long
the sequence; a chunk is priced with its scene outputs."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import offline_settings
from da3_serverless.api.budget import estimate_cost
from da3_serverless.api.schema import parse_request
from da3_serverless.sequence.assemble import Assembler
from da3_serverless.sequence.pipeline import run_sequence
from da3_serverless.sequence.plan import plan_chunks
from da3_serverless.sequence.scene import SceneCollector
from da3_serverless.sequence.share import HOLD, EvenShare, even_per_frame, water_fill
from sequence_scene import HEIGHT, WIDTH, as_prediction, oracle_chunk, random_sim3, room_scene
from sequence_standin import check_chunk_price, standin_context
from test_scene import colmap_points, read_colmap, read_ply
from videos import constant_rate, make_video

CHUNK, OVERLAP, PROCESS_RES = 4, 2, 56


def test_water_fill_gives_every_frame_an_equal_count_that_fits():
    """Frames of 5, 100, 100 and 1 items in a budget of 60: the two full frames take 27 each
    (5 + 27 + 27 + 1 = 60); with 61 the first of them takes one more; all fit in 206."""
    counts = np.array([5, 100, 100, 1])
    assert water_fill(counts, 60).tolist() == [5, 27, 27, 1]
    assert water_fill(counts, 61).tolist() == [5, 28, 27, 1]
    assert water_fill(counts, 206).tolist() == counts.tolist()


def test_even_per_frame_keeps_a_regular_subsample_of_each_frame_in_order():
    frame = np.repeat([3, 7, 9], [10, 4, 1])  # frame numbers need not be consecutive
    keep = even_per_frame(frame, 7)  # levels 3, 3, 1: 7
    assert keep.tolist() == [0, 3, 6, 10, 11, 12, 14]  # 10 // 3 apart in frame 3, 4 // 3 in 7
    assert even_per_frame(frame, 15).tolist() == list(range(15))
    shuffled = np.array([7, 3, 7, 3, 3])  # any order: each frame's items in their order
    assert even_per_frame(shuffled, 2).tolist() == [0, 1]


def _even_share(frames: int, items: int, max_points: int) -> tuple[EvenShare, list[int]]:
    """`frames` frames of `items` items each (a column: the item's frame x 1000 + its number),
    added two by two; how many were held after each add."""
    share, held = EvenShare(max_points), []
    for start in range(0, frames, 2):
        frame = np.repeat([start, start + 1], items)
        share.add({"value": frame * 1000 + np.tile(np.arange(items), 2)}, frame, 2)
        held.append(share.held)
    return share, held


def test_an_even_share_holds_at_most_its_bound_and_ends_at_max_points():
    """200 frames of 50 items each, added two by two, max_points 400: never more than HOLD x
    400 held after an add (and more than 400 at times: thinned on the way); at the end 400, 2
    a frame, each item's columns kept with it, the same items on a second run."""
    share, held = _even_share(200, 50, 400)
    assert max(held) <= HOLD * 400 < 200 * 50
    assert max(held) > 400
    kept = share.final()["value"]
    assert np.bincount(kept // 1000, minlength=200).tolist() == [2] * 200
    assert share.thinned + 400 == 200 * 50
    np.testing.assert_array_equal(_even_share(200, 50, 400)[0].final()["value"], kept)


def _predictions(frames: int, seed: int):
    """The synthetic room's chunks as a perfect network answers them (a random Sim(3) per
    chunk), aligned by the assembler."""
    rng = np.random.default_rng(seed)
    scene = room_scene(frames)
    assembler = Assembler(OVERLAP)
    for chunk in plan_chunks(frames, CHUNK, OVERLAP):
        parts = oracle_chunk(scene, range(chunk.start, chunk.stop), random_sim3(rng), rng)
        yield assembler.add(chunk, as_prediction(parts))


def test_the_scene_collector_holds_a_bounded_count_over_a_long_sequence():
    """400 frames of the synthetic room (199 chunks, a random Sim(3) each) at max_points 1200:
    after every chunk the collector holds at most HOLD x max_points points (the first chunk
    alone keeps max_points, so it passes max_points and is thinned again and again); the
    scene is 1200 points, 3 from each frame."""
    frames, max_points = 400, 1200
    fields = {"video_base64": "AAAA", "outputs": ["scene_ply"], "max_points": max_points}
    collector = SceneCollector(parse_request(fields))
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    held = []
    for aligned in _predictions(frames, seed=4):
        owned = len(aligned.outputs.depth)
        collector.add(aligned, None, [image] * owned)
        held.append(collector.kept.held)
    assert max(held) <= HOLD * max_points
    assert sum(count > max_points for count in held) > 5  # held more than max_points, thinned
    points = collector.points()
    assert len(points) == max_points
    assert np.bincount(points.view, minlength=frames).tolist() == [3] * frames
    pixels = frames * HEIGHT * WIDTH
    assert sum(points.removed.values()) + len(points) == pixels


# ---- through the pipeline: a video with and without a declared duration ----------------------


def _payload(video: bytes, **fields) -> dict:
    return {
        "video_base64": base64.b64encode(video).decode(), "chunk_size": CHUNK,
        "overlap": OVERLAP, "process_res": PROCESS_RES, "output_metric": False,
        "outputs": ["scene_ply", "colmap"], "max_points": 3000, **fields,
    }  # fmt: skip


@pytest.mark.parametrize("seekable", [False, True])
def test_a_stream_gets_max_points_from_every_frame_whatever_it_planned(tmp_path, seekable):
    """A 1 s Matroska video at 30 frames/s, written live (no duration: 2000 frames planned,
    MAX_VIDEO_FRAMES) or seekable (30 planned), through the stand-in network in chunks of 4
    overlapping by 2, max_points 3000 (before: 45 points without a duration, 2835 with one,
    frames from 0 to 178). Each 64 x 48 frame keeps far more than 100 points after the
    filters, so the water fill is exact: the PLY (plyfile) holds max_points, and read back by
    pycolmap (each point's own frame) each of the 30 frames gives 3000 / 30 = 100."""
    video = make_video(constant_rate(1.0, 30), container="matroska", seekable=seekable)
    config = offline_settings(None, tmp_path / "ws")
    response = run_sequence(standin_context(config), parse_request(_payload(video), config))
    chunks = response["sequence"]["chunks"]
    assert chunks[0]["frames_planned"] == (30 if seekable else 2000)
    # A count the headers gave has a percent; a cap (no duration) has none.
    assert chunks[-1]["percent"] == (100 if seekable else None)
    assert ("declares no length" in chunks[-1]["message"]) is not seekable
    assert response["sequence"]["frames"] == 30
    vertices = read_ply(base64.b64decode(response["scene_ply"]["base64"]))
    assert len(vertices) == response["scene"]["points"] == 3000
    assert sum(response["scene"]["removed"].values()) + 3000 == 30 * 64 * 48
    reconstruction = read_colmap(base64.b64decode(response["colmap"]["base64"]), tmp_path / "c")
    counts = np.bincount(colmap_points(reconstruction)["view"], minlength=30)
    assert counts.tolist() == [100] * 30


@pytest.mark.parametrize("outputs", [["scene_ply"], ["scene_glb", "colmap"]])
def test_a_chunk_is_priced_with_its_scene_outputs(tmp_path, outputs):
    """A chunk with scene outputs is priced as a single request of its frames with them:
    every pixel fused, the files' max_points once. A budget one pixel short refuses the request
    before any frame is predicted, naming the outputs, and leaves no file; without the scene
    outputs the same budget runs; the exact price passes (and stops at the cancel after it)."""
    video = make_video(constant_rate(2.0, 30))
    frames = [(64, 48)] * CHUNK
    price = estimate_cost("stand-in", PROCESS_RES, frames, 3000).host_pixels
    assert price > estimate_cost("stand-in", PROCESS_RES, frames).host_pixels
    config = offline_settings(None, tmp_path / "ws")
    plain = parse_request(_payload(video, fps=5, outputs=["trajectory"]), config)
    request = parse_request(_payload(video, fps=5, outputs=outputs), config)
    check_chunk_price(standin_context(config), plain, request, price, CHUNK, outputs[0])
