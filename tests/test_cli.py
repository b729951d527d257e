"""`da3-serverless` predict, warmup, prefetch and prune, run as real processes."""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import plyfile
import pycolmap
import pytest
import trimesh
from PIL import Image

from conftest import SMALL_REPO, TEST_API_KEY, offline_settings
from da3_serverless.cli import interruptible
from da3_serverless.client import parse_response
from da3_serverless.exports.encoding import decode_depth_png16
from da3_serverless.service import Service
from paths import IMAGES
from servers import free_port

# `predict --out`: every kind of file, per view and for the scene.
SCENE_RUN = {
    "outputs": ["depth", "preview", "confidence", "depth_npy", "depth_exr", "confidence_npy",
                "scene_ply", "scene_glb", "colmap"],
    "process_res": 140, "max_points": 5000, "conf_percentile": 20.0, "remove_edges": False,
    "colmap_text": True,
}  # fmt: skip


def cli(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "da3_serverless.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_predict_writes_every_array_and_a_line_per_image(service_env, tmp_path, small_snapshot):
    out = tmp_path / "out" / "scene.npz"
    images = [str(IMAGES / "soh-000.png"), str(IMAGES / "soh-010.png")]
    done = cli(service_env, "predict", *images, "--model", str(small_snapshot),
               "--process-res", "140", "-o", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "depth" in line]
    assert len(lines) == 2 and lines[0].startswith(images[0]) and "1208x680" in lines[0]
    arrays = np.load(out)
    assert arrays["depth"].shape == (2, 680, 1208)
    assert arrays["confidence"].shape == (2, 680, 1208)
    assert arrays["intrinsics"].shape == (2, 3, 3) and arrays["extrinsics"].shape == (2, 3, 4)
    assert str(arrays["units"]) == "relative"


def test_predict_bad_input_exits_2_with_the_reason(service_env, tmp_path, small_snapshot):
    done = cli(service_env, "predict", str(tmp_path / "missing.jpg"), "--model",
               str(small_snapshot), "-o", str(tmp_path / "x.npz"))  # fmt: skip
    assert done.returncode == 2
    assert "cannot read" in done.stderr and "Traceback" not in done.stderr


def three_views(folder: Path) -> list[Path]:
    """The two test photos and a crop of the second as JPEG (views of different sizes)."""
    crop = folder / "crop.jpg"
    with Image.open(IMAGES / "soh-010.png") as image:
        image.convert("RGB").crop((200, 100, 1000, 580)).save(crop, quality=92)
    return [IMAGES / "soh-000.png", IMAGES / "soh-010.png", crop]


@pytest.mark.slow
def test_predict_out_writes_the_files_the_service_returns(
    service_env, tmp_path, small_snapshot, hf_cache
):
    """`predict --out` without a server: the same bytes as the service's response for the same
    request, under the client's save_all names, read back by plyfile, trimesh and pycolmap."""
    views = three_views(tmp_path)
    out = tmp_path / "scene"
    done = cli(service_env, "predict", *map(str, views), "--model", str(small_snapshot),
               "--out", str(out), "--outputs", ",".join(SCENE_RUN["outputs"]),
               "--process-res", "140", "--max-points", "5000", "--conf-percentile", "20",
               "--no-remove-edges", "--colmap-text")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"to {out}" in done.stdout
    local = {path.name: path.read_bytes() for path in out.iterdir()}
    assert not [name for name in local if name.startswith(".")]  # no partial file left

    service = Service(offline_settings(hf_cache, tmp_path / "ws", max_response_bytes=10**9))
    images = [{"base64": base64.b64encode(path.read_bytes()).decode()} for path in views]
    response = service.handle({"api_key": TEST_API_KEY, "images": images, **SCENE_RUN})
    written = parse_response(response).save_all(tmp_path / "client", "scene")
    served = {path.name: path.read_bytes() for path in written if path.suffix != ".json"}
    assert len(served) == 3 * 6 + 3
    assert {name: data for name, data in local.items() if name != "scene.json"} == served

    metadata = json.loads(local["scene.json"])
    assert metadata["scene"] == response["scene"] and metadata["units"] == response["units"]
    assert metadata["scene"]["removed"]["edges"] == 0
    for mine, theirs in zip(metadata["views"], response["views"], strict=True):
        assert mine["intrinsics"] == theirs["intrinsics"]
        assert mine["files"]["depth"] in local
        png = decode_depth_png16(local[mine["files"]["depth"]])
        exact = np.load(io.BytesIO(local[mine["files"]["depth_npy"]]))
        step = (mine["max_depth"] - mine["min_depth"]) / 65535
        assert png.shape == (mine["height"], mine["width"])
        assert np.nanmax(np.abs(png - exact)) <= step
    check_scene_files(local, metadata["scene"]["points"], tmp_path / "colmap")


def test_ctrl_c_stops_the_forward_at_its_next_check():
    """Ctrl-C during `predict` sets the forward's cancel token (the forward stops at its next
    check) and surfaces as KeyboardInterrupt; the previous SIGINT handler comes back."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C"), interruptible() as cancel:
        os.kill(os.getpid(), signal.SIGINT)
        assert cancel.cancelled
        cancel.check()  # the network's next stop point
    assert signal.getsignal(signal.SIGINT) is before
    # After the forward's last check (nothing checks the token again): it stops all the same.
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C"), interruptible():
        os.kill(os.getpid(), signal.SIGINT)


def check_scene_files(files: dict[str, bytes], points: int, folder: Path) -> None:
    """The scene files open in plyfile, trimesh and pycolmap with `points` points."""
    assert 0 < points <= 5000
    vertex = plyfile.PlyData.read(io.BytesIO(files["scene.scene.ply"]))["vertex"]
    assert vertex.count == points
    glb = trimesh.load(io.BytesIO(files["scene.glb"]), file_type="glb")
    assert sorted(glb.geometry) == ["camera_000", "camera_001", "camera_002", "points"]
    assert len(glb.geometry["points"].vertices) == points
    with zipfile.ZipFile(io.BytesIO(files["scene.colmap.zip"])) as archive:
        assert "sparse/0/points3D.txt" in archive.namelist()  # --colmap-text
        archive.extractall(folder)
    reconstruction = pycolmap.Reconstruction()
    reconstruction.read_binary(str(folder / "sparse" / "0"))
    assert reconstruction.num_images() == 3 and reconstruction.num_points3D() == points


def test_predict_refuses_outputs_the_model_cannot_give(service_env, tmp_path, small_snapshot):
    """The service's one rule: da3-small predicts no sky; nothing is written."""
    out = tmp_path / "out"
    done = cli(service_env, "predict", str(IMAGES / "soh-000.png"), "--model",
               str(small_snapshot), "--out", str(out), "--outputs", "depth,sky_mask")  # fmt: skip
    assert done.returncode == 2
    assert "sky_mask" in done.stderr and "predicts no sky" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
    done = cli(service_env, "predict", str(IMAGES / "soh-000.png"), "--out", str(out),
               "--outputs", "depth,scene_pyl")  # fmt: skip
    assert done.returncode == 2 and "must be one of" in done.stderr
    done = cli(service_env, "predict", str(IMAGES / "soh-000.png"))
    assert done.returncode == 2 and "-o OUT.npz, --out DIR" in done.stderr


def test_warmup_succeeds_and_fails_loudly(service_env):
    done = cli(service_env, "warmup")
    assert done.returncode == 0, done.stderr
    assert f"warmup of {SMALL_REPO} ok" in done.stdout
    done = cli(service_env, "warmup", "--model", "depth-anything/DA3-BASE")
    assert done.returncode == 1
    assert "warmup of depth-anything/DA3-BASE failed" in done.stderr
    assert "not found" in done.stderr


def test_prefetch_finds_cached_and_names_what_is_missing_offline(service_env, hf_cache):
    done = cli(service_env, "prefetch", "da3-small", "depth-anything/DA3-GIANT-1.1")
    assert done.returncode == 1
    assert done.stdout.startswith("da3-small: ") and str(hf_cache) in done.stdout
    assert "model 'depth-anything/DA3-GIANT-1.1' not found" in done.stderr
    assert "HF_HUB_OFFLINE=1" in done.stderr and "Traceback" not in done.stderr


class _Refuse(http.server.BaseHTTPRequestHandler):
    """A hub that refuses every request (401), as for a private repo without a token."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("hub", ["unreachable", "refusing"])
def test_prefetch_says_whether_the_hub_was_unreachable_or_refused(service_env, tmp_path, hub):
    """A download that fails says why in its own line of the three, with no traceback: the
    hub (HF_ENDPOINT) is a closed port, or a real HTTP server on 127.0.0.1 answering 401."""
    env = {**service_env, "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "5",
           "HF_HUB_DOWNLOAD_TIMEOUT": "5"}  # fmt: skip
    with contextlib.ExitStack() as stack:
        if hub == "refusing":
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
            stack.enter_context(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.shutdown)
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
        else:
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
        done = cli(env, "prefetch", "depth-anything/DA3-GIANT-1.1", timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3, done.stderr
    expected = "the hub was unreachable" if hub == "unreachable" else "the hub refused"
    assert lines[1].startswith(expected), lines[1]
    assert hub == "unreachable" or "HTTP 401" in lines[1]
    assert "MODEL_ID=depth-anything/DA3-SMALL" in lines[2]


def test_prune_removes_only_old_outputs(service_env):
    outputs = os.path.join(service_env["WORKSPACE"], "output_images")
    os.makedirs(outputs)
    old, new = os.path.join(outputs, "old.png"), os.path.join(outputs, "new.png")
    for path in (old, new):
        with open(path, "wb") as file:
            file.write(b"x")
    month_ago = time.time() - 30 * 86400
    os.utime(old, (month_ago, month_ago))
    done = cli(service_env, "prune")
    assert done.returncode == 0, done.stderr
    assert f"removed {old}" in done.stdout and "pruned 1 file(s)" in done.stdout
    assert not os.path.exists(old) and os.path.exists(new)


class _SequenceClient:
    """Stands in for `Client` in `request --video`: sends the given chunk summaries to the
    progress callback, then answers with a sequence of `frames` frames and no files."""

    def __init__(self, summaries: list[dict], frames: int):
        self.summaries, self.frames = summaries, frames

    def video(self, path, on_progress, **options):
        for summary in self.summaries:
            on_progress(summary)

        return _SequenceResult({"frames": self.frames})


class _SequenceResult:
    def __init__(self, sequence: dict):
        self.sequence = sequence

    def save_all(self, out, stem) -> list:
        return []


@pytest.mark.parametrize(
    ("percent", "bar"), [(None, "6frame"), (75, "6/8")], ids=["no-length", "known-length"]
)
def test_the_video_progress_bar_has_a_total_only_for_a_known_length(capsys, percent, bar):
    """A video that declares no length has only a cap as its planned count (2000 here): the
    bar counts frames without a total rather than showing 6/2000."""
    from da3_serverless.cli import _request_video

    planned = 2000 if percent is None else 8
    summaries = [
        {"frames_done": 4, "frames_planned": planned, "percent": percent},
        {"frames_done": 6, "frames_planned": planned, "percent": percent},
    ]
    args = argparse.Namespace(fps=None, max_frames=None, chunk_size=None, video="clip.mp4",
                              frames_zip=None, out=".")  # fmt: skip
    assert _request_video(_SequenceClient(summaries, 6), args, {}) == 0
    err = capsys.readouterr().err
    assert bar in err and "/2000" not in err
