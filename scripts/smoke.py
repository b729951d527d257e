"""Runtime smoke: the installed package, as shipped, answers every output on both transports.

    python scripts/smoke.py [--preset da3-small] [--process-res 112] [--views 3] [--device cpu]

Needs the package and its runtime dependencies only (no test extras, no file of this
repository): `make smoke` runs it in a venv built from the image's lock, and it runs inside a
built image (README, Development). It writes a random-weight checkpoint of `--preset` with
the 3D-Gaussian head, starts RunPod's local test API around the real worker
(`python -m da3_serverless.runpod_worker --rp_serve_api`) and the self-hosted server
(`da3-serverless serve`) on it, asks each for every output with several synthetic views, and
checks every answer: the outputs the model cannot give are refused up front, the others decode
(PNG, .npy, OpenEXR, PLY, GLB with trimesh, the COLMAP zip) to finite values of the right
shape. Then a short H.264 video through the sequence path on each, every sequence output asked
for and read back (the trajectory, the depth frames, the FFV1 and VP9 videos with PyAV, the
scene files and the Gaussians). Exits non-zero, with the server's log, on the first failure.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import OpenEXR
import trimesh
from PIL import Image

from da3_serverless.api.schema import OUTPUT_NAMES, SCENE_OUTPUTS
from da3_serverless.inference.catalog import lookup_model
from da3_serverless.model.checkpoint import write_random_checkpoint

START_TIMEOUT_S = 600  # a cold start on a busy two-core machine
REQUEST_TIMEOUT_S = 600
PER_VIEW = ("preview", "confidence", "depth_npy", "confidence_npy", "depth_exr", "pointcloud")
SEQUENCE_OUTPUTS = ["trajectory", "depth_frames", "depth_video", "preview_video", "scene_ply",
                    "scene_glb", "colmap", "gaussians_ply"]  # fmt: skip
VIDEO_FRAMES = 12


class SmokeError(AssertionError):
    """An answer that is not what the contract says."""


def check(condition: object, what: str) -> None:
    if not condition:
        raise SmokeError(what)


# ---- inputs ------------------------------------------------------------------------------------


def synthetic_scene(count: int, width: int = 160, height: int = 120) -> list[np.ndarray]:
    """`count` RGB views of one made-up scene (a lit gradient with texture), each shifted."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 60, (height, width + 8 * count, 3))
    ramp = np.linspace(40, 190, width + 8 * count)[None, :, None]
    scene = np.clip(texture + ramp, 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(scene[:, 8 * i : 8 * i + width]) for i in range(count)]


def synthetic_views(count: int) -> list[dict[str, str]]:
    """`count` PNG views of the made-up scene, as the request's `images`."""
    views = []
    for pixels in synthetic_scene(count):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        views.append({"base64": base64.b64encode(out.getvalue()).decode()})
    return views


def synthetic_video(count: int) -> str:
    """A pan across the made-up scene as an H.264 MP4 at 10 frames/s, in base64."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for pixels in synthetic_scene(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return base64.b64encode(out.getvalue()).decode()


def refused_outputs(preset: str) -> set[str]:
    """What a random checkpoint of `preset` with the 3D-Gaussian head cannot give when asked
    for relative depth (output_metric false: no millimetres; no sky head: no sky mask); the
    rest it must give."""
    info = lookup_model(preset)
    check(info is not None and info.camera, f"{preset}: the smoke needs a model with a camera")
    refused = set() if info.sky else {"sky_mask"}
    return refused | {"depth_mm_png"}


# ---- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], ready_url: str, log: Path) -> Iterator[None]:
    """`command` in the background until GET `ready_url` answers 200; stopped on exit. Its
    output goes to `log`, printed when anything inside fails."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while not _answers(ready_url):
            check(process.poll() is None, f"{command[0]} exited with {process.returncode}")
            check(time.monotonic() < started + START_TIMEOUT_S, f"not ready in {START_TIMEOUT_S} s")
            time.sleep(0.3)
        print(f"{ready_url}: ready in {time.monotonic() - started:.1f} s", flush=True)
        yield
    except BaseException:
        sys.stderr.write(f"--- {' '.join(command)}\n{log.read_text(errors='replace')[-6000:]}\n")
        raise
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def server_env(model: Path, workspace: Path, key: str, device: str | None) -> dict[str, str]:
    env = {**os.environ, "MODEL_ID": str(model), "WORKSPACE": str(workspace), "DA3_API_KEY": key}
    env.update(HF_HUB_OFFLINE="1", RUNPOD_VOLUME=str(workspace / "no-volume"))
    if device:
        env["DA3_DEVICE"] = device
    return env


def cli_command() -> list[str]:
    """The installed `da3-serverless` console script (beside this interpreter, else on PATH)."""
    here = Path(sys.executable).parent
    script = shutil.which("da3-serverless", path=os.pathsep.join([str(here), os.environ["PATH"]]))
    check(script, "the da3-serverless command is not installed")
    return [str(script)]


# ---- asking ------------------------------------------------------------------------------------


def ask_worker(url: str, request: dict) -> tuple[int, dict]:
    """RunPod's job object for `request`: (status, the output) when it completed, else (the
    error's status, our error object, which RunPod carries as JSON text)."""
    reply = httpx.post(f"{url}/runsync", json={"input": request}, timeout=REQUEST_TIMEOUT_S)
    job = reply.json()
    if job.get("status") == "COMPLETED":
        return reply.status_code, job["output"]
    check("error" in job, f"worker: neither output nor error: {str(job)[:300]}")
    error = job["error"]
    error = json.loads(error) if isinstance(error, str) else error
    return error.get("status", reply.status_code), error


def ask_server(url: str, request: dict) -> tuple[int, dict]:
    """The self-hosted server's answer: (HTTP status, the response or the error object)."""
    key = request["api_key"]
    body = {k: v for k, v in request.items() if k != "api_key"}
    reply = httpx.post(
        f"{url}/runsync",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=REQUEST_TIMEOUT_S,
    )
    answer = reply.json()
    return reply.status_code, answer.get("error", answer) if reply.status_code != 200 else answer


def exercise(name: str, ask, base: dict, refused: set[str], sizes: list[tuple[int, int]]) -> None:
    """Refusals first (each output the model cannot give, alone), then everything else at once."""
    for output in sorted(refused):
        status, error = ask({**base, "outputs": ["depth", output]})
        check(status == 400 and error.get("code") == "invalid_input", f"{name}: {output} {error}")
        check(f"{output}: " in error.get("message", ""), f"{name}: {output}: {error}")
    outputs = [n for n in OUTPUT_NAMES if n not in refused]
    started = time.perf_counter()
    status, body = ask({**base, "outputs": outputs})
    check(status == 200, f"{name}: {status} {str(body)[:500]}")
    check_response(body, sizes)
    print(f"{name}: {len(outputs)} outputs x {len(sizes)} views ok "
          f"({time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip


def exercise_sequence(name: str, ask, base: dict) -> None:
    """A video through the chunked sequence path, every sequence output asked for."""
    request = {key: value for key, value in base.items() if key != "images"}
    request.update(video_base64=synthetic_video(VIDEO_FRAMES), chunk_size=4, overlap=2,
                   outputs=SEQUENCE_OUTPUTS)  # fmt: skip
    started = time.perf_counter()
    status, body = ask(request)
    check(status == 200, f"{name} video: {status} {str(body)[:500]}")
    check_sequence(body, VIDEO_FRAMES)
    print(f"{name}: a video of {VIDEO_FRAMES} frames, {len(SEQUENCE_OUTPUTS)} outputs ok "
          f"({time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip


# ---- checking ----------------------------------------------------------------------------------


def payload(entry: dict | None, what: str) -> bytes:
    """An output's bytes: inline, or the file the server stored it in (same machine)."""
    check(isinstance(entry, dict), f"{what}: missing")
    if entry.get("base64"):
        return base64.b64decode(entry["base64"])
    check(entry.get("path"), f"{what}: neither base64 nor path")
    return Path(entry["path"]).read_bytes()


def finite(values: np.ndarray, what: str) -> np.ndarray:
    check(values.size > 0 and np.isfinite(values).all(), f"{what}: empty or not finite")
    return values


def check_response(body: dict, sizes: list[tuple[int, int]]) -> None:
    views = body.get("views")
    check(isinstance(views, list) and len(views) == len(sizes), "one entry per view")
    for index, (view, size) in enumerate(zip(views, sizes, strict=True)):
        check_view(view, size, f"view {index}")
    check_scene(body, len(sizes))


def check_view(view: dict, size: tuple[int, int], what: str) -> None:
    width, height = size
    check((view["width"], view["height"]) == size, f"{what}: size {view['width']}x{view['height']}")
    finite(np.asarray(view["intrinsics"], dtype=float).reshape(3, 3), f"{what} intrinsics")
    finite(np.asarray(view["extrinsics"], dtype=float).reshape(3, 4), f"{what} extrinsics")
    depth = np.load(io.BytesIO(payload(view["depth_npy"], f"{what} depth_npy")))
    check(depth.shape == (height, width) and depth.dtype == np.float32, f"{what}: depth_npy")
    finite(depth, f"{what} depth_npy")
    with Image.open(io.BytesIO(base64.b64decode(view["image_base64"]))) as png:
        levels = np.asarray(png, dtype=np.float64)
    lo, hi = view["min_depth"], view["max_depth"]
    decoded = lo + levels * (hi - lo) / 65535  # the README's decode
    error = np.abs(decoded - depth).max()
    check(error <= (hi - lo) / 131070 * (1 + 1e-6) + 1e-12, f"{what}: depth PNG off by {error}")
    for name, mode in (("preview", "RGB"), ("confidence", "L")):
        with Image.open(io.BytesIO(payload(view[name], f"{what} {name}"))) as image:
            check(image.size == size and image.mode == mode, f"{what}: {name} {image}")
    confidence = np.load(io.BytesIO(payload(view["confidence_npy"], f"{what} confidence_npy")))
    check(confidence.shape == (height, width), f"{what}: confidence_npy {confidence.shape}")
    finite(confidence, f"{what} confidence_npy")
    check_exr(payload(view["depth_exr"], f"{what} depth_exr"), depth, what)
    cloud = trimesh.load(io.BytesIO(payload(view["pointcloud"], f"{what} pointcloud")), "ply")
    finite(np.asarray(cloud.vertices), f"{what} pointcloud")


def check_exr(data: bytes, depth: np.ndarray, what: str) -> None:
    with OpenEXR.File(io.BytesIO(data), separate_channels=True) as exr:
        channels = exr.channels()
        check(list(channels) == ["Y"], f"{what}: depth_exr channels {list(channels)}")
        pixels = channels["Y"].pixels
    check(np.array_equal(pixels, depth), f"{what}: depth_exr differs from depth_npy")


def check_scene(body: dict, views: int) -> None:
    points = body["scene"]["points"]
    check(points > 0, "scene: no points")
    cloud = trimesh.load(io.BytesIO(payload(body["scene_ply"], "scene_ply")), "ply")
    check(len(finite(np.asarray(cloud.vertices), "scene_ply")) == points, "scene_ply: count")
    glb = trimesh.load(io.BytesIO(payload(body["scene_glb"], "scene_glb")), "glb")
    check(isinstance(glb, trimesh.Scene), "scene_glb: not a scene")
    frustums = [name for name in glb.geometry if name.startswith("camera_")]
    check(len(frustums) == views, f"scene_glb: {len(frustums)} frustums for {views} views")
    finite(np.asarray(glb.bounds), "scene_glb bounds")
    with zipfile.ZipFile(io.BytesIO(payload(body["colmap"], "colmap"))) as colmap:
        names = set(colmap.namelist())
        needed = {f"sparse/0/{n}.bin" for n in ("cameras", "images", "points3D")}
        check(needed <= names, f"colmap: {sorted(names)}")
        for index in range(views):
            with Image.open(io.BytesIO(colmap.read(f"images/view_{index:03d}.png"))) as png:
                check(png.format == "PNG", f"colmap: view {index}")
    gaussians = trimesh.load(io.BytesIO(payload(body["gaussians_ply"], "gaussians_ply")), "ply")
    count = len(finite(np.asarray(gaussians.vertices), "gaussians_ply"))
    check(count == body["gaussians"]["points"] > 0, f"gaussians_ply: {count} Gaussians")
    check(set(SCENE_OUTPUTS) <= set(body), "scene outputs missing")


def check_sequence(body: dict, frames: int) -> None:
    sequence = body["sequence"]
    check(sequence["frames"] == frames, f"video: {sequence['frames']} frames")
    finite(np.array([chunk["scale"] for chunk in sequence["chunks"]]), "video: chunk scales")
    with zipfile.ZipFile(io.BytesIO(payload(body["trajectory"], "trajectory"))) as archive:
        poses = archive.read("trajectory.tum").decode().splitlines()
    poses = [line for line in poses if not line.startswith("#")]
    finite(np.loadtxt(poses, ndmin=2), "trajectory")
    check(len(poses) == frames, f"trajectory: {len(poses)} poses")
    with zipfile.ZipFile(io.BytesIO(payload(body["depth_frames"], "depth_frames"))) as archive:
        pngs = [n for n in archive.namelist() if n.endswith(".png")]
    check(len(pngs) == frames, f"depth_frames: {len(pngs)} PNGs")
    for name, codec in (("depth_video", "ffv1"), ("preview_video", "vp9")):
        with av.open(io.BytesIO(payload(body[name], name))) as video:
            stream = video.streams.video[0]
            check(stream.codec_context.name == codec, f"{name}: {stream.codec_context.name}")
            count = sum(1 for _ in video.decode(stream))
        check(count == frames, f"{name}: {count} frames")
    check_scene(body, frames)


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="da3-small")
    parser.add_argument("--process-res", type=int, default=112)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--device", default=None, help="DA3_DEVICE (default: the server's)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="da3-smoke-") as tmp:
        root = Path(tmp)
        model = write_random_checkpoint(args.preset, root / "model", seed=0, gaussians=True)
        key = secrets.token_urlsafe(24)
        env = server_env(model, root / "workspace", key, args.device)
        views = synthetic_views(args.views)
        base = {"api_key": key, "images": views, "process_res": args.process_res,
                "output_metric": False}  # fmt: skip
        sizes = [(160, 120)] * args.views
        refused = refused_outputs(args.preset)
        port = free_port()
        worker = [sys.executable, "-m", "da3_serverless.runpod_worker", "--rp_serve_api",
                  "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with running(worker, env, f"{url}/", root / "worker.log"):
            exercise("runpod worker", lambda r: ask_worker(url, r), base, refused, sizes)
            exercise_sequence("runpod worker", lambda r: ask_worker(url, r), base)
        port = free_port()
        serve = [*cli_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        with running(serve, env, f"{url}/ready", root / "server.log"):
            exercise("self-hosted server", lambda r: ask_server(url, r), base, refused, sizes)
            exercise_sequence("self-hosted server", lambda r: ask_server(url, r), base)
    print(f"smoke passed in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
