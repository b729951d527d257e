"""Memory stays flat as a sequence grows: with the stand-in network, the traced peak of a 60 s
video is within 25 % of a 10 s one at the same chunk size (tracemalloc: Python's and numpy's
allocations; FFmpeg's own buffers are not traced, and they do not depend on the length). The
job asks for the per-frame outputs (`depth_frames`, `depth_video`, `trajectory`) as paths:
their files go from the frame store to the output folder without being read into memory."""

from __future__ import annotations

import base64
import tracemalloc
import zipfile
from pathlib import Path

import av
import pytest

from conftest import offline_settings
from da3_serverless.api.schema import parse_request
from da3_serverless.sequence.pipeline import run_sequence
from sequence_standin import standin_context
from videos import constant_rate, make_video

OUTPUTS = ["trajectory", "depth_frames", "depth_video"]


def _peak(video: bytes, settings) -> tuple[int, dict]:
    payload = {"video_base64": base64.b64encode(video).decode(), "fps": 10, "chunk_size": 20,
               "overlap": 5, "output_metric": False, "outputs": OUTPUTS,
               "return_base64": False}  # fmt: skip
    request = parse_request(payload, settings)
    del payload
    tracemalloc.start()
    try:
        response = run_sequence(standin_context(settings), request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, response


def _frames_in(response: dict) -> tuple[int, int]:
    """The frame counts of the saved zip and video, read back by zipfile and PyAV."""
    with zipfile.ZipFile(response["depth_frames"]["path"]) as archive:
        pngs = sum(name.endswith(".png") for name in archive.namelist())
    with av.open(response["depth_video"]["path"]) as video:
        decoded = sum(1 for _ in video.decode(video=0))
    return pngs, decoded


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_length(tmp_path):
    settings = offline_settings(None, tmp_path, max_response_bytes=100_000_000)
    size = {"width": 320, "height": 240}
    short = make_video(constant_rate(10, 30), **size)
    long = make_video(constant_rate(60, 30), **size)
    short_peak, short_response = _peak(short, settings)
    long_peak, long_response = _peak(long, settings)
    print(f"traced peak: 10 s {short_peak / 1e6:.1f} MB, 60 s {long_peak / 1e6:.1f} MB")
    assert short_response["sequence"]["frames"] == 100
    assert long_response["sequence"]["frames"] == 600
    assert _frames_in(short_response) == (100, 100)
    assert _frames_in(long_response) == (600, 600)
    big = Path(long_response["depth_frames"]["path"]).stat().st_size
    assert big > 0.25 * short_peak  # holding the zip in memory would break the bound
    assert long_peak <= 1.25 * short_peak, (short_peak, long_peak)
    assert not list((settings.workspace_dir / "sequences").iterdir())  # the frames are gone
