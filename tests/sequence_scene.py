"""A synthetic scene for the sequence tests: a camera moving through a box-shaped room (six
planes), with its true depth, intrinsics and poses per frame, and a stand-in network that
returns them in a random Sim(3) frame per chunk (as a real network's chunk-local answer)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from da3_serverless.inference.prediction import Prediction
from da3_serverless.sequence.align import Sim3
from da3_serverless.sequence.assemble import ChunkFrames

HEIGHT, WIDTH, FOCAL = 24, 32, 28.0
# Planes n . X = c of the room (OpenCV axes: y down, z forward).
PLANES = [((1, 0, 0), 5.0), ((1, 0, 0), -5.0), ((0, 1, 0), 3.0), ((0, 1, 0), -3.0),
          ((0, 0, 1), 24.0), ((0, 0, 1), -24.0)]  # fmt: skip


def _rotation_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


@dataclass
class Scene:
    depth: np.ndarray  # (N, H, W)
    intrinsics: np.ndarray  # (N, 3, 3)
    extrinsics: np.ndarray  # (N, 3, 4) world-to-camera

    def __len__(self) -> int:
        return len(self.depth)


def room_scene(frames: int) -> Scene:
    """The camera walks forward and sideways through the room, turning and nodding."""
    intrinsics = np.array([[FOCAL, 0, WIDTH / 2], [0, FOCAL, HEIGHT / 2], [0, 0, 1]])
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    rays = np.stack([cols, rows, np.ones_like(rows)], -1) @ np.linalg.inv(intrinsics).T
    depths, poses = [], []
    for i in range(frames):
        phase = i / max(frames - 1, 1)
        c2w = _rotation_y(0.5 * np.sin(3 * phase)) @ _rotation_x(0.15 * np.cos(5 * phase))
        centre = np.array([2.5 * np.sin(2 * phase), 0.8 * np.cos(4 * phase), -10 + 18 * phase])
        directions = rays @ c2w.T
        depth = np.full((HEIGHT, WIDTH), np.inf)
        for normal, offset in PLANES:
            normal = np.asarray(normal, float)
            along = directions @ normal
            with np.errstate(divide="ignore"):
                t = (offset - normal @ centre) / along
            depth = np.where((t > 0) & (t < depth), t, depth)
        depths.append(depth)
        poses.append(np.concatenate([c2w.T, (-c2w.T @ centre)[:, None]], 1))
    return Scene(np.array(depths), np.repeat(intrinsics[None], frames, 0), np.array(poses))


def random_sim3(rng: np.random.Generator) -> Sim3:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    rotation = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])  # fmt: skip
    return Sim3(float(np.exp(rng.uniform(-1.5, 1.5))), rotation, rng.normal(scale=5, size=3))


def oracle_chunk(scene: Scene, frames: range, frame: Sim3, rng: np.random.Generator) -> ChunkFrames:
    """What a perfect network would answer for `frames`, in the chunk-local `frame`, with a
    random positive confidence."""
    part = slice(frames.start, frames.stop)
    return ChunkFrames(
        scene.depth[part] * frame.scale,
        rng.uniform(1.0, 3.0, size=scene.depth[part].shape),
        scene.intrinsics[part].copy(),
        frame.move_extrinsics(scene.extrinsics[part]),
    )


def as_prediction(frames: ChunkFrames, sky=None, gaussians=None) -> Prediction:
    """Oracle frames as the network's float32 `Prediction` (relative units), with `sky` and
    `gaussians` when given."""
    return Prediction(
        frames.depth.astype(np.float32), frames.confidence.astype(np.float32), sky,
        frames.intrinsics.astype(np.float32), frames.extrinsics.astype(np.float32),
        is_metric=False, units="relative", gaussians=gaussians,
    )  # fmt: skip
