"""The 3DGS PLY writer: the standard layout, read back with plyfile (the PLY library of the 3DGS
tooling) and by hand, with the viewers' activations undoing the stored inversions."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
from plyfile import PlyData

from da3_serverless.exports.gaussians import PROPERTIES, SH_C0, gaussians_ply


@dataclass
class Arrays:
    means: np.ndarray
    scales: np.ndarray
    rotations: np.ndarray
    opacities: np.ndarray
    colors: np.ndarray


def random_gaussians(shape: tuple[int, ...] = (2, 3, 4), seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return Arrays(
        means=rng.normal(size=(*shape, 3)).astype(np.float32),
        scales=rng.uniform(1e-3, 2.0, size=(*shape, 3)).astype(np.float32),
        rotations=rng.normal(size=(*shape, 4)).astype(np.float32),  # any norm
        opacities=rng.uniform(0.01, 0.99, size=shape).astype(np.float32),
        colors=rng.uniform(-0.1, 1.1, size=(*shape, 3)).astype(np.float32),
    )


def read(data: bytes) -> np.ndarray:
    vertex = PlyData.read(io.BytesIO(data))["vertex"]
    assert [p.name for p in vertex.properties] == list(PROPERTIES)
    return vertex.data


def columns(vertex: np.ndarray, *names: str) -> np.ndarray:
    return np.stack([vertex[name] for name in names], axis=-1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_activations_round_trip():
    gaussians = random_gaussians()
    vertex = read(gaussians_ply(gaussians))
    assert len(vertex) == 24
    flat = {name: getattr(gaussians, name).reshape(24, -1) for name in ("means", "scales")}
    np.testing.assert_array_equal(columns(vertex, "x", "y", "z"), flat["means"])
    np.testing.assert_allclose(
        sigmoid(vertex["opacity"]), gaussians.opacities.reshape(-1), rtol=1e-5
    )
    scales = np.exp(columns(vertex, "scale_0", "scale_1", "scale_2"))
    np.testing.assert_allclose(scales, flat["scales"], rtol=1e-5)
    quat = columns(vertex, "rot_0", "rot_1", "rot_2", "rot_3")
    np.testing.assert_allclose(np.linalg.norm(quat, axis=1), 1.0, rtol=1e-6)
    expected = gaussians.rotations.reshape(24, 4)
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(quat, expected, rtol=1e-5, atol=1e-6)  # w first, as given
    dc = columns(vertex, "f_dc_0", "f_dc_1", "f_dc_2")
    np.testing.assert_allclose(0.5 + SH_C0 * dc, gaussians.colors.reshape(24, 3), atol=1e-6)


def test_layout_is_binary_little_endian_float32():
    data = gaussians_ply(random_gaussians(), comments=["units m", "made by a test"])
    header, _, body = data.partition(b"end_header\n")
    lines = header.decode("ascii").splitlines()
    assert lines[:5] == [
        "ply",
        "format binary_little_endian 1.0",
        "comment units m",
        "comment made by a test",
        "element vertex 24",
    ]
    assert lines[5:] == [f"property float {name}" for name in PROPERTIES]
    assert len(body) == 24 * len(PROPERTIES) * 4
    by_hand = np.frombuffer(body, dtype=[(name, "<f4") for name in PROPERTIES])
    assert np.array_equal(by_hand, read(data).astype(by_hand.dtype))


def test_mask_edge_values_and_non_finite_gaussians():
    gaussians = random_gaussians((5,))
    gaussians.opacities[:2] = [0.0, 1.0]  # clipped before the logit
    gaussians.scales[2] = [-0.5, 0.0, 1.0]  # magnitude, floored before the log
    gaussians.rotations[3] = 0.0  # no rotation: the identity
    gaussians.means[4, 0] = np.nan  # left out
    vertex = read(gaussians_ply(gaussians))
    assert len(vertex) == 4
    assert all(np.isfinite(vertex[name]).all() for name in PROPERTIES)
    np.testing.assert_allclose(sigmoid(vertex["opacity"][:2]), [0, 1], atol=1e-5)
    np.testing.assert_allclose(
        np.exp(columns(vertex, "scale_0", "scale_1", "scale_2")[2]), [0.5, 1e-12, 1.0], rtol=1e-5
    )
    np.testing.assert_array_equal(
        columns(vertex, "rot_0", "rot_1", "rot_2", "rot_3")[3], [1, 0, 0, 0]
    )

    keep = np.array([True, False, True, False, True])
    kept = read(gaussians_ply(gaussians, keep=keep))
    np.testing.assert_array_equal(kept["x"], vertex["x"][[0, 2]])
    assert len(read(gaussians_ply(gaussians, keep=np.zeros(5, dtype=bool)))) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda g: setattr(g, "colors", g.colors[..., :2]), r"gaussians.colors must have shape"),
        (lambda g: setattr(g, "rotations", g.rotations[:1]), r"gaussians.rotations must have"),
    ],
)
def test_mismatched_arrays_are_refused(change, message):
    gaussians = random_gaussians()
    change(gaussians)
    with pytest.raises(ValueError, match=message):
        gaussians_ply(gaussians)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="keep must be a boolean mask of shape"):
        gaussians_ply(random_gaussians(), keep=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="one line of ASCII"):
        gaussians_ply(random_gaussians(), comments=["two\nlines"])
