"""The Node tools the tests run on scene files (tests/js, installed by `make js`): Khronos' glTF
validator and the playground's vendored three.js GLTFLoader. Without node or the installed
packages a test that needs them skips locally and fails under CI=true."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from paths import REPO

JS = REPO / "tests" / "js"


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "gltf-validator").is_dir():
        message = "node or tests/js/node_modules is missing: run `make js`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return node


def read_glb_in_node(data: bytes, folder: Path) -> dict:
    """The GLB as tests/js/read_glb.mjs reads it: {"validator": {errors, warnings, messages},
    "cameras": [three.js cameras: name, type, fov, aspect, near, extras, matrixWorld,
    projectionMatrix]}."""
    node = node_or_skip()
    path = folder / "scene.glb"
    path.write_bytes(data)
    done = subprocess.run(
        [node, str(JS / "read_glb.mjs"), str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def three_js_pixels(camera: dict, xyz: np.ndarray, width: int, height: int) -> np.ndarray:
    """(M, 2) pixel coordinates (x right, y down, from the image's top left corner) of glTF-frame
    points `xyz` through a three.js camera's own world and projection matrices, as its
    renderer maps normalised device coordinates to a `width` x `height` viewport."""
    to_world = np.asarray(camera["matrixWorld"], np.float64).reshape(4, 4).T  # column-major
    projection = np.asarray(camera["projectionMatrix"], np.float64).reshape(4, 4).T
    homogeneous = np.c_[np.asarray(xyz, np.float64), np.ones(len(xyz))]
    clip = homogeneous @ (projection @ np.linalg.inv(to_world)).T
    assert (clip[:, 3] > 0).all(), "points behind the camera"
    ndc = clip[:, :2] / clip[:, 3:]
    return np.stack([(ndc[:, 0] + 1) / 2 * width, (1 - ndc[:, 1]) / 2 * height], axis=1)
