"""The chunked sequence path through the real service: a synthetic video (or photos with
`"sequence": true` past MAX_VIEWS) through the random-weight da3-small at a tiny
`process_res`, chunk by chunk; the trajectory (TUM + cameras JSON) and the depth frames (one
linear decode for all) read back from their zips; progress per chunk; cancel cleans up."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conftest import TEST_API_KEY, offline_settings
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.job import JobInfo
from da3_serverless.api.schema import RunResponse, parse_request
from da3_serverless.api.video import Sampling, iter_frames, open_video
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.sequence.pipeline import run_sequence
from da3_serverless.sequence.plan import plan_chunks
from da3_serverless.service import Service
from js_tools import read_glb_in_node
from paths import IMAGES
from sequence_standin import files_left, standin_context
from test_scene import check_colmap, read_colmap, read_glb, read_ply
from videos import constant_rate, make_video

PROCESS_RES = 56


@pytest.fixture(scope="module")
def service(hf_cache, tmp_path_factory) -> Service:
    return Service(offline_settings(hf_cache, tmp_path_factory.mktemp("workspace"), max_views=2))


@pytest.fixture(scope="module")
def video() -> bytes:
    return make_video(constant_rate(2.0, 30))


def _request(video: bytes, **fields) -> dict:
    return {
        "api_key": TEST_API_KEY, "video_base64": base64.b64encode(video).decode(), "fps": 5,
        "chunk_size": 4, "overlap": 2, "process_res": PROCESS_RES, "output_metric": False,
        "outputs": ["trajectory", "depth_frames", "depth_video"], **fields,
    }  # fmt: skip


def _zip(entry: dict) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(base64.b64decode(entry["base64"])))


def _decode_png(data: bytes, low: float, high: float) -> np.ndarray:
    codes = np.asarray(Image.open(io.BytesIO(data))).astype(np.float64)
    return low + codes * (high - low) / 65535


@pytest.fixture(scope="module")
def chunked(service, video) -> tuple[dict, list[dict]]:
    """One video request in chunks, and the progress it reported."""
    progress: list[dict] = []
    outputs = [
        "trajectory", "depth_frames", "depth_video", "preview_video", "scene_ply", "scene_glb",
        "colmap",
    ]  # fmt: skip
    request = _request(video, outputs=outputs, max_points=3000)
    response = service.handle(request, job=JobInfo(progress=progress.append))
    return response, progress


def _depth_frames(response: dict) -> tuple[list[np.ndarray], float, float]:
    archive = _zip(response["depth_frames"])
    meta = json.loads(archive.read("frames.json"))
    low, high = meta["min_depth"], meta["max_depth"]
    depth = [_decode_png(archive.read(f["file"]), low, high) for f in meta["frames"]]
    return depth, low, high


def test_a_video_in_chunks(chunked):
    response, progress = chunked
    RunResponse.model_validate(response)
    sequence = response["sequence"]
    assert sequence["frames"] == 10
    assert sequence["timestamps"] == pytest.approx([i / 5 for i in range(10)], abs=1e-3)
    spans = [(c.start, c.stop) for c in plan_chunks(10, 4, 2)]
    assert [(c["start"], c["stop"]) for c in sequence["chunks"]] == spans
    assert progress == sequence["chunks"]
    assert [c["frames_done"] for c in progress] == [4, 6, 8, 10]
    assert sequence["chunks"][0]["scale"] == 1.0
    assert all(c["scale"] > 0 and np.isfinite(c["residual"]) for c in sequence["chunks"])

    lines = _zip(response["trajectory"]).read("trajectory.tum").decode().splitlines()
    poses = np.array([[float(v) for v in line.split()] for line in lines[1:]])
    assert poses.shape == (10, 8)
    np.testing.assert_allclose(poses[:, 0], sequence["timestamps"], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(poses[:, 4:], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(poses[0, 1:], [0, 0, 0, 0, 0, 0, 1], atol=1e-5)  # first camera
    cameras = json.loads(_zip(response["trajectory"]).read("cameras.json"))
    assert (cameras["width"], cameras["height"]) == (64, 48) and len(cameras["frames"]) == 10

    archive = _zip(response["depth_frames"])
    meta = json.loads(archive.read("frames.json"))
    low, high = meta["min_depth"], meta["max_depth"]
    assert (low, high) == (response["min_depth"], response["max_depth"])
    assert [f["timestamp"] for f in meta["frames"]] == sequence["timestamps"]
    depth, _, _ = _depth_frames(response)
    assert all(d.shape == (48, 64) for d in depth)
    assert all(np.isfinite(d).all() and d.min() >= low and d.max() <= high for d in depth)


def test_the_depth_video_holds_the_depth_frames_codes_losslessly(chunked):
    """FFV1 gray16le in Matroska, read back with PyAV (FFmpeg): every frame's 16-bit codes
    equal the PNG's, at the frame's timestamp, with the decode in the container's tags."""
    response = chunked[0]
    archive = _zip(response["depth_frames"])
    meta = json.loads(archive.read("frames.json"))
    data = base64.b64decode(response["depth_video"]["base64"])
    assert response["depth_video"]["media_type"] == "video/x-matroska"
    with av.open(io.BytesIO(data)) as container:
        tags = {key.lower(): value for key, value in container.metadata.items()}
        assert float(tags["min_depth"]) == meta["min_depth"]
        assert float(tags["max_depth"]) == meta["max_depth"]
        stream = container.streams.video[0]
        assert stream.codec_context.name == "ffv1"
        decoded = list(container.decode(stream))
    assert len(decoded) == len(meta["frames"])
    for frame, entry in zip(decoded, meta["frames"], strict=True):
        assert frame.format.name == "gray16le"
        png = np.asarray(Image.open(io.BytesIO(archive.read(entry["file"]))))
        np.testing.assert_array_equal(frame.to_ndarray(), png)
        assert frame.time == pytest.approx(entry["timestamp"], abs=1e-3)


def test_the_preview_video_is_vp9_in_webm_with_every_frame(chunked):
    response = chunked[0]
    assert response["preview_video"]["media_type"] == "video/webm"
    data = base64.b64decode(response["preview_video"]["base64"])
    with av.open(io.BytesIO(data)) as container:
        assert container.format.name == "matroska,webm"
        stream = container.streams.video[0]
        assert stream.codec_context.name in ("vp9", "libvpx-vp9")
        frames = list(container.decode(stream))
    assert len(frames) == 10
    assert [round(f.time, 3) for f in frames] == [
        round(t, 3) for t in response["sequence"]["timestamps"]
    ]
    assert (frames[0].width, frames[0].height) == (64, 48)


def test_the_scene_cloud_counts_each_frame_once(chunked):
    """scene_ply fuses the owned frames only (10 frames, not the 16 forwarded), each chunk
    thinned evenly per frame to its share of max_points; trimesh reads the PLY back."""
    import trimesh

    response = chunked[0]
    scene = response["scene"]
    cloud = trimesh.load(io.BytesIO(base64.b64decode(response["scene_ply"]["base64"])), "ply")
    assert len(cloud.vertices) == scene["points"]
    assert 0 < scene["points"] <= 3000
    pixels = 10 * 64 * 48  # every owned frame's pixels, once
    assert sum(scene["removed"].values()) + scene["points"] == pixels
    assert np.isfinite(cloud.vertices).all()


def _cameras(response: dict) -> tuple[np.ndarray, np.ndarray]:
    """The frames' intrinsics and world-to-camera extrinsics, from the trajectory's JSON."""
    frames = json.loads(_zip(response["trajectory"]).read("cameras.json"))["frames"]
    return (
        np.array([f["intrinsics"] for f in frames]),
        np.array([f["extrinsics"] for f in frames]),
    )


def test_the_scene_glb_has_a_camera_per_frame(chunked, tmp_path):
    """Khronos' validator finds no error in the sequence's GLB; three.js builds one camera per
    owned frame (10), each with that frame's intrinsics and size; the cloud is scene_ply's."""
    response = chunked[0]
    data = base64.b64decode(response["scene_glb"]["base64"])
    read = read_glb_in_node(data, tmp_path)
    assert read["validator"]["errors"] == 0, read["validator"]["messages"]
    intrinsics, _ = _cameras(response)
    cameras = read["cameras"]
    assert [c["name"] for c in cameras] == [f"view_{i:03d}" for i in range(10)]
    for index, camera in enumerate(cameras):
        extras = camera["extras"]
        assert (extras["view"], extras["width"], extras["height"]) == (index, 64, 48)
        np.testing.assert_allclose(extras["intrinsics"], intrinsics[index], atol=1e-9)
    cloud, frustums = read_glb(data)
    ply = read_ply(base64.b64decode(response["scene_ply"]["base64"]))
    assert len(frustums) == 10
    np.testing.assert_allclose(cloud.vertices, np.c_[ply["x"], -ply["y"], -ply["z"]], atol=1e-6)


def test_the_colmap_model_has_an_image_per_frame(chunked, tmp_path):
    """pycolmap reads the sequence's model: one PINHOLE camera and image per owned frame with
    the trajectory's cameras and poses, scene_ply's points, each on its own pixel; the images
    are the frames' RGB (each point's colour is its pixel's in its image)."""
    response = chunked[0]
    reconstruction = read_colmap(base64.b64decode(response["colmap"]["base64"]), tmp_path)
    intrinsics, extrinsics = _cameras(response)
    count = response["scene"]["points"]
    points = check_colmap(reconstruction, intrinsics, extrinsics, [(64, 48)] * 10, count)
    images = [np.asarray(Image.open(tmp_path / "images" / f"view_{i:03d}.png")) for i in range(10)]
    assert all(image.shape == (48, 64, 3) for image in images)
    view, row, col = points["view"], points["row"], points["col"]
    colours = np.stack([images[v][r, c] for v, r, c in zip(view, row, col, strict=True)])
    np.testing.assert_array_equal(colours, points["rgb"])
    ply = read_ply(base64.b64decode(response["scene_ply"]["base64"]))
    np.testing.assert_allclose(
        np.sort(points["xyz"], axis=0),
        np.sort(np.c_[ply["x"], ply["y"], ply["z"]], axis=0),
        atol=1e-5,
    )


@pytest.mark.slow
def test_the_first_chunk_equals_a_plain_request_on_its_frames(service, video, chunked):
    """Chunk 0 is the sequence's frame: its depth is the predictor's own on those frames (to
    the depth PNG's quantisation step)."""
    depth, low, high = _depth_frames(chunked[0])
    settings = service.settings
    opened = open_video(video, Sampling(fps=5, max_frames=4), settings)
    images = [frame.image for frame in iter_frames(opened, settings)]
    with service.model_cache.use(service.default_model_id) as predictor:
        plain = predictor.predict(images, process_res=PROCESS_RES, metric=False)
    step = (high - low) / 65535
    for index in range(4):
        np.testing.assert_allclose(depth[index], plain.depth[index], atol=step)


@pytest.mark.slow
def test_photos_as_a_sequence_past_max_views(service):
    photo = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()
    other = base64.b64encode((IMAGES / "soh-010.png").read_bytes()).decode()
    images = [{"base64": photo}, {"base64": other}] * 3  # 6 views, MAX_VIEWS is 2
    plain = {"api_key": TEST_API_KEY, "images": images, "process_res": PROCESS_RES}
    with pytest.raises(ServiceError, match="sequence"):
        service.handle(plain)
    response = service.handle({
        **plain, "sequence": True, "chunk_size": 3, "overlap": 1, "fps": 2,
        "output_metric": False, "outputs": ["trajectory"],
    })  # fmt: skip
    assert response["sequence"]["frames"] == 6
    assert response["sequence"]["timestamps"] == [0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert len(response["sequence"]["chunks"]) == len(plan_chunks(6, 3, 1))


def test_photos_of_another_size_in_a_sequence_are_refused_leaving_nothing(service):
    photo = (IMAGES / "soh-000.png").read_bytes()
    buffer = io.BytesIO()
    Image.open(IMAGES / "soh-010.png").resize((604, 340)).save(buffer, format="PNG")
    images = [{"base64": base64.b64encode(data).decode()}
              for data in (photo, photo, photo, buffer.getvalue())]  # fmt: skip
    with pytest.raises(ServiceError, match=r"images\[3\] is 604x340 .* first frame is 1208x680"):
        service.handle({
            "api_key": TEST_API_KEY, "images": images, "process_res": PROCESS_RES,
            "sequence": True, "chunk_size": 2, "overlap": 1, "output_metric": False,
            "outputs": ["trajectory"],
        })  # fmt: skip
    assert not list((service.settings.workspace_dir / "sequences").iterdir())


def test_cancel_after_a_chunk_leaves_no_file(service, video):
    token = CancelToken()
    workspace = service.settings.workspace_dir

    def cancel_after_first(summary: dict) -> None:
        assert list((workspace / "sequences").iterdir())  # frames on disk meanwhile
        token.cancel("cancelled by the test")

    with pytest.raises(ServiceError) as caught:
        service.handle(_request(video), cancel=token, job=JobInfo(progress=cancel_after_first))
    assert caught.value.code == "cancelled"
    assert not list((workspace / "sequences").iterdir())
    assert not files_left(service.settings)


def test_a_stream_without_duration_runs_or_stops_at_the_limit_leaving_no_file(hf_cache, tmp_path):
    """Matroska written as a live stream declares no duration, so only decoding finds its
    length: a short one runs with its exact frames and times; a longer one than
    MAX_VIDEO_DURATION_S stops with the documented error at the first frame past it, after the
    chunks of the frames within it were on disk, and leaves no file."""
    settings = offline_settings(hf_cache, tmp_path / "workspace", max_video_duration_s=1.0)
    service = Service(settings)
    short = make_video(constant_rate(1.0, 30), container="matroska", seekable=False)
    response = service.handle(_request(short, outputs=["trajectory"]))
    assert response["sequence"]["timestamps"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8], abs=1e-3)
    assert [(c["start"], c["stop"]) for c in response["sequence"]["chunks"]] == [(0, 4), (2, 5)]

    written: list[int] = []
    long = make_video(constant_rate(4.0, 30), container="matroska", seekable=False)
    progress = JobInfo(progress=lambda summary: written.append(summary["frames_done"]))
    with pytest.raises(ServiceError) as caught:
        service.handle(_request(long), job=progress)
    assert caught.value.code == "request_too_large"
    assert "MAX_VIDEO_DURATION_S" in caught.value.message
    assert written == [4, 6]  # the frames at 0 to 1.0 s ran; the one at 1.033 s stopped it
    assert not list((settings.workspace_dir / "sequences").iterdir())
    assert not files_left(settings)


def test_outputs_as_paths_are_files_moved_from_the_frames_folder(service, video, chunked):
    """With `return_base64` false each output is a file on the volume, moved there from the
    job's frames folder (never read whole into memory), with the inline answer's content."""
    outputs = service.settings.output_dir
    before = set(outputs.iterdir()) if outputs.exists() else set()
    response = service.handle(_request(video, return_base64=False))
    entries = [response[name] for name in ("trajectory", "depth_frames", "depth_video")]
    assert all("base64" not in entry for entry in entries)
    paths = {Path(entry["path"]) for entry in entries}
    assert set(outputs.iterdir()) - before == paths
    with zipfile.ZipFile(response["depth_frames"]["path"]) as archive:
        inline = _zip(chunked[0]["depth_frames"])
        assert archive.namelist() == inline.namelist()
        assert archive.read("frames.json") == inline.read("frames.json")
    with av.open(response["depth_video"]["path"]) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10
    assert not list((service.settings.workspace_dir / "sequences").iterdir())
    service.store.discard(paths)  # other tests of the module check that no file is left


def _standin(tmp_path, video: bytes, return_base64: bool = False, **settings):
    """A sequence request through the stand-in network (no model): 10 frames in chunks of 4,
    the outputs asked for as paths unless `return_base64`. Returns (response, settings)."""
    config = offline_settings(None, tmp_path / "ws", **settings)
    payload = {key: value for key, value in _request(video).items() if key != "api_key"}
    payload["return_base64"] = return_base64
    response = run_sequence(standin_context(config), parse_request(payload, config))
    return response, config


def test_outputs_stored_nowhere_go_inline_and_leave_no_file(tmp_path, video):
    """Paths asked for, but the volume is unwritable (its folder is a file) and there is no
    bucket: each output goes inline after all (within MAX_RESPONSE_BYTES), with warnings that
    say so, and the frames folder with the outputs' files in it is gone."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "output_images").write_bytes(b"")  # not a folder
    response, config = _standin(tmp_path, video)
    for name in ("trajectory", "depth_frames", "depth_video"):
        assert response[name].keys() == {"media_type", "base64"}
        assert any(f"could not save {name} on the volume" in w for w in response["warnings"])
        assert f"{name} could not be stored, so it is inline" in response["warnings"]
    frames = _zip(response["depth_frames"])
    assert len([n for n in frames.namelist() if n.endswith(".png")]) == 10
    assert not list((config.workspace_dir / "sequences").iterdir())


def test_outputs_stored_nowhere_past_the_budget_fail_the_request(tmp_path, video):
    """Stored nowhere and too large to go inline: the request fails with `request_too_large`
    naming what to set, instead of "succeeding" with nothing; no file is left anywhere."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "output_images").write_bytes(b"")
    with pytest.raises(ServiceError) as caught:
        _standin(tmp_path, video, max_response_bytes=100)
    assert caught.value.code == "request_too_large"
    message = caught.value.message
    assert message.startswith("trajectory could not be stored (could not save trajectory on")
    assert "(100 of 100 bytes)" in message and "no bucket is configured" in message
    assert "writable volume (WORKSPACE" in message and "BUCKET_ENDPOINT_URL" in message
    workspace = tmp_path / "ws"
    assert not list((workspace / "sequences").iterdir())
    assert [p.name for p in workspace.rglob("*") if p.is_file()] == ["output_images"]


def test_outputs_past_the_response_budget_go_to_the_bucket_and_volume(tmp_path, video, s3_endpoint):
    """Under a small MAX_RESPONSE_BYTES the trajectory goes inline (read from its file) and
    the rest is uploaded from the file, then moved to the volume: the URL serves the file."""
    import boto3
    import httpx

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="secret", region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="sequences")
    response, config = _standin(
        tmp_path, video, return_base64=True, max_response_bytes=20_000,
        bucket_endpoint_url=f"{s3_endpoint}/sequences", bucket_access_key_id="testing",
        bucket_secret_access_key="secret",
    )  # fmt: skip
    trajectory = zipfile.ZipFile(io.BytesIO(base64.b64decode(response["trajectory"]["base64"])))
    assert len(trajectory.read("trajectory.tum").decode().splitlines()) == 11
    for name in ("depth_frames", "depth_video"):
        entry = response[name]
        assert "base64" not in entry
        assert httpx.get(entry["url"]).content == Path(entry["path"]).read_bytes()
    assert len(s3.list_objects_v2(Bucket="sequences")["Contents"]) == 2
    assert not list((config.workspace_dir / "sequences").iterdir())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"outputs": ["depth"]}, "a sequence gives"),
        ({"extrinsics": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]}, "extrinsics"),
        ({"chunk_size": 4, "overlap": 4}, "overlap must be less"),
        ({"start_s": 1.0, "end_s": 0.5}, "end_s must be after"),
    ],
)
def test_sequence_requests_are_checked(service, video, fields, message):
    with pytest.raises(ServiceError, match=message):
        service.handle(_request(video, **fields))


def test_the_runpod_worker_sends_each_chunk_as_progress(service, video, monkeypatch):
    """RunPod's handler gives the service a progress callback that calls runpod-python's
    `progress_update` with each chunk's summary (the handler stays a plain function)."""
    import asyncio

    import runpod

    from da3_serverless.runpod_worker import make_handler

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        runpod.serverless, "progress_update", lambda j, p: sent.append((j["id"], p))
    )
    handler = make_handler(service)
    request = _request(video, max_frames=6, outputs=["trajectory"])
    response = asyncio.run(handler({"id": "job-1", "input": request}))
    assert "error" not in response, response
    assert sent == [("job-1", chunk) for chunk in response["sequence"]["chunks"]]
    assert len(sent) == len(plan_chunks(6, 4, 2))


def test_runpods_stop_signal_after_a_chunk_leaves_no_file(service, video, monkeypatch):
    """RunPod's own JobScaler takes a video job with the real handler; its stop signal comes
    once the first chunk's summary went out with `progress_update` (the local API has no
    /cancel, tests/test_sequence_runpod.py), and the scaler cancels the handler's task: the
    job stops at its next check, reports nothing, and leaves no file, the frames of the chunk
    already announced included. The summary waits in `progress_update` until RunPod's cancel
    reached the job, so the moment is exact rather than timed."""
    import threading

    import runpod

    from da3_serverless.runpod_worker import make_handler
    from da3_serverless.server.queue import Job
    from runpod_scaler import stop_one_job

    workspace = service.settings.workspace_dir
    announced, cancelled = threading.Event(), threading.Event()
    sent: list[dict] = []
    on_disk: list[bool] = []

    def progress_update(job: dict, update: dict) -> None:  # from the job's thread
        sent.append(update)
        on_disk.append(bool(list((workspace / "sequences").iterdir())))
        announced.set()
        cancelled.wait(60)

    def request_cancel(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        cancelled.set()

    original = Job.request_cancel
    monkeypatch.setattr(runpod.serverless, "progress_update", progress_update)
    monkeypatch.setattr(Job, "request_cancel", request_cancel)
    job = {"id": "video-stopped", "input": _request(video)}
    reported, _ = stop_one_job(make_handler(service), job, announced)
    assert reported == [] and cancelled.is_set()
    assert [update["chunk"] for update in sent] == [0] and on_disk == [True]
    assert not list((workspace / "sequences").iterdir())
    assert not files_left(service.settings)


def test_status_shows_the_latest_progress_while_the_job_runs():
    from da3_serverless.server.jobs import job_body
    from da3_serverless.server.queue import COMPLETED, IN_PROGRESS, Job

    job = Job(id="job-2")
    job.status = IN_PROGRESS
    job.info.progress({"chunk": 0, "frames_done": 4})
    job.info.progress({"chunk": 1, "frames_done": 6})
    assert job_body(job)["output"] == {"chunk": 1, "frames_done": 6}
    job.status, job.output = COMPLETED, {"sequence": {"frames": 6}}
    assert job_body(job)["output"] == {"sequence": {"frames": 6}}


def test_stream_hands_out_each_update_once_then_the_result():
    from da3_serverless.server.queue import COMPLETED, IN_PROGRESS, Job

    job = Job(id="job-3")
    job.status = IN_PROGRESS
    job.info.progress({"chunk": 0})
    job.info.progress({"chunk": 1})
    assert job.take_stream() == [{"output": {"chunk": 0}}, {"output": {"chunk": 1}}]
    assert job.take_stream() == []
    job.info.progress({"chunk": 2})
    job.status, job.output, job.size = COMPLETED, {"sequence": {"frames": 6}}, 30
    assert job.take_stream() == [{"output": {"chunk": 2}}, {"output": {"sequence": {"frames": 6}}}]
    assert job.take_stream() == []
