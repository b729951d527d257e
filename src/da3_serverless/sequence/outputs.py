"""A sequence's outputs, written frame by frame: `FrameStore` keeps each aligned frame's
depth on disk as it is produced (float32 .npy) and its camera and time in memory; once the last
chunk fixes the depth range, `depth_frames_zip` encodes every frame with that ONE linear decode
(16-bit PNGs) and `trajectory_zip` writes the camera-to-world poses in TUM format with a JSON
of the cameras; `depth_video_mkv` writes the same codes as a lossless 16-bit video (FFV1
gray16le in Matroska)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from trimesh.transformations import quaternion_from_matrix

from da3_serverless.exports.encoding import COLORMAP, DEPTH_ENCODING, write_png
from da3_serverless.inference.prediction import Prediction


@dataclass
class FrameStore:
    """The aligned frames of one sequence: depth files under `folder` (removed by `close`),
    with `keep_images` each frame's RGB input too (uint8 .npy, for COLMAP's images: the
    cheapest copy to write and read back, encoded once when the zip is written), timestamps,
    intrinsics and world-to-camera extrinsics in memory, and the running depth range over
    every finite value."""

    folder: Path
    timestamps: list[float] = field(default_factory=list)
    intrinsics: list[np.ndarray] = field(default_factory=list)
    extrinsics: list[np.ndarray] = field(default_factory=list)
    min_depth: float = math.inf
    max_depth: float = -math.inf
    size: tuple[int, int] | None = None  # (width, height) of the last frame
    sizes: set[tuple[int, int]] = field(default_factory=set)
    scene: Any = None  # the scene collector when a scene file is asked (sequence/scene.py)
    gaussians: Any = None  # the Gaussians' collector with gaussians_ply (sequence/gaussians.py)
    keep_images: bool = False
    shapes: list[tuple[int, int]] = field(default_factory=list)  # each frame's (height, width)

    @staticmethod
    def create(parent: Path) -> FrameStore:
        parent.mkdir(parents=True, exist_ok=True)
        return FrameStore(Path(tempfile.mkdtemp(prefix="sequence-", dir=parent)))

    def add(self, timestamp: float, depth: np.ndarray, intrinsics, extrinsics, image=None) -> None:
        """One frame; `image` (its upright RGB input) is saved with `keep_images`."""
        if self.keep_images:
            np.save(self._path(len(self.timestamps), "image"), np.asarray(image, np.uint8))
        np.save(self._path(len(self.timestamps)), np.asarray(depth, np.float32))
        finite = depth[np.isfinite(depth)]
        if finite.size:
            self.min_depth = min(self.min_depth, float(finite.min()))
            self.max_depth = max(self.max_depth, float(finite.max()))
        self.size = (depth.shape[1], depth.shape[0])
        self.sizes.add(self.size)
        self.shapes.append(depth.shape)
        self.timestamps.append(float(timestamp))
        self.intrinsics.append(np.asarray(intrinsics, np.float64))
        self.extrinsics.append(np.asarray(extrinsics, np.float64))

    def depth(self, index: int) -> np.ndarray:
        return np.load(self._path(index))

    def image(self, index: int) -> np.ndarray:
        return np.load(self._path(index, "image"))

    def cameras(self, units: str) -> Prediction:
        """Every frame's camera as a `Prediction` for the scene exports, which read of the
        depth only each frame's size: its depth is one zero-stride NaN placeholder per frame
        (no memory per pixel), its intrinsics and extrinsics the frames' own."""
        depth = np.empty(len(self), dtype=object)
        for index, shape in enumerate(self.shapes):
            depth[index] = np.broadcast_to(np.float32(np.nan), shape)
        return Prediction(
            depth, None, None, np.stack(self.intrinsics), np.stack(self.extrinsics),
            is_metric=False, units=units,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.timestamps)

    def depth_range(self) -> tuple[float, float]:
        if self.min_depth > self.max_depth:
            return 0.0, 0.0
        return self.min_depth, self.max_depth

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, index: int, kind: str = "depth") -> Path:
        return self.folder / f"{kind}-{index:06d}.npy"


def quantize(depth: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint16 codes of `depth` on the linear scale low..high (depth = low + v (high - low) /
    65535); NaN and -inf give 0, +inf 65535."""
    scale = 65535.0 / (high - low) if high > low else 0.0
    codes = (np.asarray(depth, np.float64) - low) * scale
    codes = np.where(np.isposinf(depth), 65535.0, np.where(np.isfinite(depth), codes, 0.0))
    return np.rint(np.clip(codes, 0, 65535)).astype(np.uint16)


def depth_frames_zip(frames: FrameStore, units: str, target: Path) -> Path:
    """`target`: a zip of one 16-bit PNG per frame (`frame_000000.png`, ...), all sharing one
    linear decode, and `frames.json` (the decode, units and each frame's timestamp)."""
    low, high = frames.depth_range()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for index in range(len(frames)):
            codes = quantize(frames.depth(index), low, high)
            text = {"min_depth": repr(low), "max_depth": repr(high), "units": units}
            archive.writestr(f"frame_{index:06d}.png", write_png(codes, text))
        archive.writestr("frames.json", json.dumps(_frames_json(frames, units), indent=1))
    return target


def _frames_json(frames: FrameStore, units: str) -> dict:
    low, high = frames.depth_range()
    return {
        "depth_encoding": DEPTH_ENCODING,
        "min_depth": low,
        "max_depth": high,
        "decode": "depth = min_depth + v * (max_depth - min_depth) / 65535",
        "units": units,
        "frames": [
            {"file": f"frame_{i:06d}.png", "timestamp": t} for i, t in enumerate(frames.timestamps)
        ],
    }


def tum_lines(frames: FrameStore) -> str:
    """Camera-to-world poses, one line per frame: `timestamp tx ty tz qx qy qz qw`."""
    lines = ["# timestamp tx ty tz qx qy qz qw (camera-to-world, OpenCV camera axes)"]
    for timestamp, extrinsics in zip(frames.timestamps, frames.extrinsics, strict=True):
        rotation = extrinsics[:, :3].T
        centre = -rotation @ extrinsics[:, 3]
        matrix = np.eye(4)
        matrix[:3, :3] = rotation
        w, x, y, z = quaternion_from_matrix(matrix)
        if w < 0:
            w, x, y, z = -w, -x, -y, -z
        values = [timestamp, *centre, x, y, z, w]
        lines.append(" ".join(f"{v:.9g}" for v in values))
    return "\n".join(lines) + "\n"


def trajectory_zip(frames: FrameStore, units: str, target: Path) -> Path:
    """`target`: a zip of `trajectory.tum` (TUM format, read by evo) and `cameras.json`
    (each frame's timestamp, intrinsics and world-to-camera extrinsics, the frame size)."""
    width, height = frames.size or (0, 0)
    cameras = {
        "width": width,
        "height": height,
        "units": units,
        "frames": [
            {"timestamp": t, "intrinsics": k.tolist(), "extrinsics": e.tolist()}
            for t, k, e in zip(frames.timestamps, frames.intrinsics, frames.extrinsics, strict=True)
        ],
    }
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("trajectory.tum", tum_lines(frames))
        archive.writestr("cameras.json", json.dumps(cameras))
    return target


def depth_video_mkv(frames: FrameStore, units: str, target: Path) -> Path:
    """`target`: the frames' depth codes (those of `depth_frames_zip`: one linear decode) as
    FFV1 gray16le in Matroska, lossless, each frame at its timestamp (millisecond clock; a
    frame never shares its predecessor's tick). The decode is in the container's tags
    (`min_depth`, `max_depth`, `units`, `depth_encoding`). Frames must share one size."""
    low, high = frames.depth_range()
    width, height = frames.size or (0, 0)
    clock = Fraction(1, 1000)
    with av.open(str(target), "w", format="matroska") as out:
        out.metadata.update({
            "min_depth": repr(low), "max_depth": repr(high), "units": units,
            "depth_encoding": DEPTH_ENCODING,
        })  # fmt: skip
        stream = out.add_stream("ffv1", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "gray16le"
        stream.time_base = stream.codec_context.time_base = clock
        previous = -1
        for index, timestamp in enumerate(frames.timestamps):
            frame = av.VideoFrame.from_ndarray(
                quantize(frames.depth(index), low, high), format="gray16le"
            )
            frame.pts = previous = max(previous + 1, round(timestamp * 1000))
            frame.time_base = clock
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return target


def preview_video_webm(frames: FrameStore, units: str, target: Path) -> Path:
    """`target`: the frames' depth colourised (near bright, far dark; one colour scale for the
    whole sequence, from its depth range) as VP9 in WebM, which browsers play; libvpx is
    BSD-licensed (no x264). Odd sizes lose their last row or column (4:2:0 chroma)."""
    low, high = frames.depth_range()
    width, height = frames.size or (0, 0)
    width, height = max(width - width % 2, 2), max(height - height % 2, 2)
    clock = Fraction(1, 1000)
    with av.open(str(target), "w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = clock
        previous = -1
        for index, timestamp in enumerate(frames.timestamps):
            codes = quantize(frames.depth(index), low, high)[:height, :width]
            colours = COLORMAP[255 - (codes >> 8).astype(np.uint8)]  # near is bright
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(colours), format="rgb24")
            frame.pts = previous = max(previous + 1, round(timestamp * 1000))
            frame.time_base = clock
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return target
