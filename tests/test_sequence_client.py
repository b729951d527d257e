"""A video end to end through a real self-hosted server (a subprocess on 127.0.0.1):
`Client.video` with a progress callback, and `da3-serverless request --video`, their files read
back (the TUM trajectory, the depth frames' PNGs, the FFV1 video)."""

from __future__ import annotations

import io
import json
import zipfile

import av
import numpy as np
import pytest

from conftest import TEST_API_KEY
from da3_serverless.cli import main
from da3_serverless.client import Client
from videos import constant_rate, make_video

FIELDS = {"fps": 5, "chunk_size": 4, "overlap": 2, "process_res": 56, "output_metric": False}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    path.write_bytes(make_video(constant_rate(2.0, 30)))
    return path


@pytest.mark.slow
def test_client_video(small_server, clip):
    seen: list[dict] = []
    with Client(small_server, api_key=TEST_API_KEY, poll_interval=0.05) as client:
        outputs = ["trajectory", "depth_frames", "depth_video"]
        result = client.video(clip, on_progress=seen.append, outputs=outputs, **FIELDS)
    chunks = result.sequence["chunks"]
    assert len(chunks) == 4 and result.sequence["frames"] == 10
    # Whatever progress the polls caught is one of the chunks' summaries, in order.
    assert all(update in chunks for update in seen)
    assert [chunks.index(u) for u in seen] == sorted(chunks.index(u) for u in seen)
    poses = result.trajectory()
    assert poses.shape == (10, 8)
    np.testing.assert_allclose(poses[:, 0], [i / 5 for i in range(10)], atol=1e-3)
    with zipfile.ZipFile(io.BytesIO(result.outputs["depth_frames"])) as archive:
        assert len([n for n in archive.namelist() if n.endswith(".png")]) == 10
    with av.open(io.BytesIO(result.outputs["depth_video"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10


@pytest.mark.slow
def test_request_video_command(small_server, clip, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["request", "--video", str(clip), "--endpoint", small_server, "--api-key",
            TEST_API_KEY, "--out", str(out), "--fps", "5", "--chunk-size", "4",
            "--process-res", "56", "--relative", "--outputs",
            "trajectory,depth_frames,preview_video,scene_ply,scene_glb"]  # fmt: skip
    assert main(argv) == 0
    assert "video: 10 frames; wrote 6 file(s)" in capsys.readouterr().out
    for name in ("preview_video.webm", "scene.ply", "glb"):  # each by its own kind
        assert (out / f"video.{name}").stat().st_size > 0
    with zipfile.ZipFile(out / "video.trajectory.zip") as archive:
        lines = archive.read("trajectory.tum").decode().splitlines()
    assert len(lines) == 11 and lines[0].startswith("# timestamp tx ty tz qx qy qz qw")
    meta = json.loads((out / "video.json").read_text())
    assert meta["sequence"]["chunk_size"] == 4 and meta["sequence"]["overlap"] == 2
    assert (out / "video.depth_frames.zip").exists()
    assert main(["request", "--video", str(clip), str(clip), "--endpoint", small_server]) == 2


@pytest.mark.slow
def test_runpod_sdk_streams_a_sequence_from_the_self_hosted_server(small_server, clip, monkeypatch):
    """runpod-python's `Job.stream()` against the self-hosted `/v2/<id>/stream/<job>`: every
    chunk summary once, in order, then the final output."""
    import base64

    import runpod

    monkeypatch.setattr(runpod, "endpoint_url_base", f"{small_server}/v2")
    endpoint = runpod.Endpoint("local", api_key=TEST_API_KEY)
    request = {"video_base64": base64.b64encode(clip.read_bytes()).decode(),
               "outputs": ["trajectory"], **FIELDS}  # fmt: skip
    job = endpoint.run({"input": request})
    items = list(job.stream())
    final = items[-1]
    chunks = final["sequence"]["chunks"]
    summaries = [item for item in items[:-1] if item.get("stage") == "sequence"]
    assert summaries == chunks
