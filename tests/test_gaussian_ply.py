"""The 3DGS PLY writer in both layouts, read back with plyfile (the PLY library of the 3DGS
tooling), by hand, with INRIA's `load_ply` rules and SIBR's header rule at degree 3, and with
gsply (a 3DGS PLY reader from another project), the viewers' activations undoing the stored
inversions."""

from __future__ import annotations

import io
from dataclasses import dataclass

import gsply
import numpy as np
import pytest
from plyfile import PlyData

from da3_serverless.exports.gaussians import INRIA_PROPERTIES, PROPERTIES, SH_C0, gaussians_ply


@dataclass
class Arrays:
    means: np.ndarray
    scales: np.ndarray
    rotations: np.ndarray
    opacities: np.ndarray
    colors: np.ndarray
    sh_rest: np.ndarray | None = None


def random_gaussians(shape: tuple[int, ...] = (2, 3, 4), seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return Arrays(
        means=rng.normal(size=(*shape, 3)).astype(np.float32),
        scales=rng.uniform(1e-3, 2.0, size=(*shape, 3)).astype(np.float32),
        rotations=rng.normal(size=(*shape, 4)).astype(np.float32),  # any norm
        opacities=rng.uniform(0.01, 0.99, size=shape).astype(np.float32),
        colors=rng.uniform(-0.1, 1.1, size=(*shape, 3)).astype(np.float32),
        sh_rest=rng.normal(scale=0.1, size=(*shape, 3, 8)).astype(np.float32),
    )


def read(data: bytes) -> np.ndarray:
    vertex = PlyData.read(io.BytesIO(data))["vertex"]
    names = [p.name for p in vertex.properties]
    assert names in (list(INRIA_PROPERTIES), list(PROPERTIES))
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


def test_compact_layout_is_binary_little_endian_float32():
    data = gaussians_ply(
        random_gaussians(), comments=["units m", "made by a test"], layout="compact"
    )
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
    with pytest.raises(ValueError, match="layout must be one of"):
        gaussians_ply(random_gaussians(), layout="spz")


# ---- the INRIA layout, as INRIA's 3DGS, SIBR and gsply read it ---------------------------------

INRIA_SH_DEGREE = 3  # INRIA's GaussianModel default


def inria_load(data: bytes) -> dict[str, np.ndarray]:
    """INRIA's `GaussianModel.load_ply` rules, through plyfile as it reads: xyz, opacity, the DC
    and the rest features (sorted by their index, exactly 3 ((degree + 1)^2 - 1) of them,
    reshaped to (N, 3, rest): channel first), scales and rotations by sorted name."""
    vertex = PlyData.read(io.BytesIO(data)).elements[0]
    names = [p.name for p in vertex.properties]

    def sorted_names(prefix: str) -> list[str]:
        return sorted(
            (n for n in names if n.startswith(prefix)), key=lambda n: int(n.split("_")[-1])
        )

    rest = sorted_names("f_rest_")
    assert len(rest) == 3 * (INRIA_SH_DEGREE + 1) ** 2 - 3
    stack = lambda keys: np.stack([np.asarray(vertex[k]) for k in keys], axis=1)  # noqa: E731
    return {
        "xyz": stack(["x", "y", "z"]),
        "opacity": np.asarray(vertex["opacity"]),
        "dc": stack(["f_dc_0", "f_dc_1", "f_dc_2"]),
        "rest": stack(rest).reshape(len(vertex.data), 3, (INRIA_SH_DEGREE + 1) ** 2 - 1),
        "scale": stack(sorted_names("scale_")),
        "rot": stack(sorted_names("rot")),
    }


def test_inria_layout_follows_inria_and_sibr_rules():
    gaussians = random_gaussians()
    data = gaussians_ply(gaussians, comments=["units m"])
    header, _, body = data.partition(b"end_header\n")
    lines = header.decode("ascii").splitlines()
    # SIBR reads the count from the third line and fixed 62-float records after end_header.
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 24"]
    assert lines[3:] == [f"property float {n}" for n in INRIA_PROPERTIES] + ["comment units m"]
    assert len(INRIA_PROPERTIES) == 62 and len(body) == 24 * 62 * 4
    record = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    record += [f"f_rest_{i}" for i in range(45)] + ["opacity"]
    record += ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert list(INRIA_PROPERTIES) == record
    by_hand = np.frombuffer(body, dtype="<f4").reshape(24, 62)
    np.testing.assert_array_equal(by_hand[:, 3:6], 0)  # normals

    loaded = inria_load(data)
    np.testing.assert_array_equal(loaded["xyz"], gaussians.means.reshape(24, 3))
    np.testing.assert_allclose(0.5 + SH_C0 * loaded["dc"], gaussians.colors.reshape(24, 3),
                               atol=1e-6)  # fmt: skip
    # Degrees 1 and 2 as predicted, channel by channel; degree 3 zero.
    np.testing.assert_array_equal(loaded["rest"][:, :, :8], gaussians.sh_rest.reshape(24, 3, 8))
    np.testing.assert_array_equal(loaded["rest"][:, :, 8:], 0)
    np.testing.assert_array_equal(loaded["rest"], by_hand[:, 9:54].reshape(24, 3, 15))
    np.testing.assert_allclose(sigmoid(loaded["opacity"]), gaussians.opacities.reshape(24),
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.exp(loaded["scale"]), gaussians.scales.reshape(24, 3), rtol=1e-5)


def test_gsply_reads_the_inria_file(tmp_path):
    gaussians = random_gaussians()
    path = tmp_path / "gaussians.ply"
    path.write_bytes(gaussians_ply(gaussians, comments=["units m"]))
    read_back = gsply.plyread(str(path))
    np.testing.assert_array_equal(read_back.means, gaussians.means.reshape(24, 3))
    np.testing.assert_allclose(np.exp(read_back.scales), gaussians.scales.reshape(24, 3), rtol=1e-5)
    np.testing.assert_allclose(sigmoid(read_back.opacities), gaussians.opacities.reshape(24),
                               rtol=1e-5)  # fmt: skip
    quats = gaussians.rotations.reshape(24, 4)
    quats = quats / np.linalg.norm(quats, axis=1, keepdims=True)
    np.testing.assert_allclose(read_back.quats, quats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(0.5 + SH_C0 * read_back.sh0, gaussians.colors.reshape(24, 3),
                               atol=1e-6)  # fmt: skip
    # gsply's shN is (N, 15, 3): coefficient by channel.
    assert read_back.shN.shape == (24, 15, 3)
    expected = np.zeros((24, 15, 3), np.float32)
    expected[:, :8] = gaussians.sh_rest.reshape(24, 3, 8).transpose(0, 2, 1)
    np.testing.assert_array_equal(read_back.shN, expected)


def test_without_higher_bands_the_rest_is_zero():
    gaussians = random_gaussians()
    gaussians.sh_rest = None
    loaded = inria_load(gaussians_ply(gaussians))
    np.testing.assert_array_equal(loaded["rest"], 0)
