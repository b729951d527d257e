"""The 3D-Gaussian branch end to end on small networks: built and loaded strictly when (and only
when) a checkpoint holds its keys, run only when asked, scaled with the nested model's depth,
moved with given poses, and returned by the Predictor in the frame and units of the depth."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData
from safetensors import safe_open
from safetensors.torch import save_file

from da3_serverless.exports.gaussians import gaussians_ply
from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import load_rgb, processing_size, to_network_input
from da3_serverless.model import spherical_harmonics
from da3_serverless.model.camera import quaternion_to_rotation, rotation_to_quaternion
from da3_serverless.model.checkpoint import (
    CheckpointError,
    load_network,
    loaded_bytes,
    write_random_checkpoint,
)
from da3_serverless.model.dpt import DPT
from da3_serverless.model.gaussians import GaussianAdapter, GaussianMaps, reframe
from da3_serverless.model.net import DepthAnything3Net, NestedDepthAnything3Net
from da3_serverless.model.presets import attach_gaussian_branch, build_network
from da3_serverless.model.vit import DinoV2
from paths import IMAGES

PHOTOS = [IMAGES / "soh-000.png", IMAGES / "soh-010.png"]
RES = 140
FIELDS = ("means", "scales", "rotations", "opacities", "harmonics")


@pytest.fixture(scope="module")
def gs_snapshot(tmp_path_factory) -> Path:
    """da3-small (seed 0) with a 3D-Gaussian head: the branch fits any any-view network."""
    folder = tmp_path_factory.mktemp("da3-small-gs")
    return write_random_checkpoint("da3-small", folder, seed=0, gaussians=True)


@pytest.fixture(scope="module")
def gs_net(gs_snapshot) -> DepthAnything3Net:
    return load_network(gs_snapshot)[1]


@pytest.fixture(scope="module")
def gs_predictor(gs_snapshot) -> Predictor:
    return Predictor.from_pretrained(gs_snapshot, device="cpu")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118


def images(views: int = 2) -> torch.Tensor:
    return torch.randn(1, views, 3, 42, 56, generator=torch.Generator().manual_seed(3))


def test_branch_comes_from_the_checkpoint_keys(gs_snapshot, small_snapshot, gs_net):
    tensors = read_tensors(gs_snapshot)
    head_keys = {key for key in tensors if "gs_head" in key}
    assert head_keys == {f"model.gs_head.{name}" for name in gs_net.gs_head.state_dict()}
    assert not [key for key in tensors if "gs_adapter" in key]  # the adapter stores nothing
    # The same seed gives every other tensor the same value: only the head is added.
    plain = read_tensors(small_snapshot)
    assert set(plain) == set(tensors) - head_keys
    assert all(torch.equal(plain[key], tensors[key]) for key in plain)

    _, net = load_network(small_snapshot)
    assert gs_net.has_gaussians and not net.has_gaussians
    with torch.no_grad():
        plain_out, gs_out = net(images()), gs_net(images())
    assert torch.equal(plain_out.depth, gs_out.depth)
    assert gs_out.gaussians is None  # only when asked


def test_branch_loads_strictly(tmp_path, gs_snapshot):
    tensors = read_tensors(gs_snapshot)
    missing = "model.gs_head.images_merger.0.weight"
    shaped = "model.gs_head.scratch.output_conv2.2.bias"
    del tensors[missing]
    tensors[shaped] = torch.zeros(7)
    folder = tmp_path / "broken"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_name": "da3-small"}')
    with pytest.raises(CheckpointError) as err:
        load_network(folder)
    assert f"missing keys (1: {missing})" in str(err.value)
    assert f"{shaped} (7,) instead of (38,)" in str(err.value)


def test_only_any_view_networks_take_the_branch():
    with torch.device("meta"):
        mono = build_network("da3mono-large")
        nested = build_network("da3nested-giant-large")
        with pytest.raises(ValueError, match="only any-view networks"):
            attach_gaussian_branch(mono)
        attach_gaussian_branch(nested)
    assert nested.has_gaussians
    names = [name for name in nested.state_dict() if "gs_" in name]
    assert names and all(name.startswith("da3.gs_head.") for name in names)
    # The release configuration: 3072-wide tokens in, 37 raw channels and a density out.
    assert nested.da3.gs_head.projects[0].in_channels == 3072
    assert nested.da3.gs_head.scratch.output_conv2[2].out_channels == 38


def test_gaussian_branch_is_held_in_fp32_and_counted(gs_snapshot):
    _, net = load_network(gs_snapshot, dtype=torch.bfloat16)
    assert {p.dtype for p in net.gs_head.parameters()} == {torch.float32}
    assert net.backbone.pretrained.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(images(), gaussians=True).gaussians.means.dtype == torch.float32
    # The memory estimate of the releases with the head counts it (35.6 M fp32 parameters).
    with torch.device("meta"):
        giant = build_network("da3-giant")
    tensors = [*giant.parameters(), *giant.buffers()]  # tied tensors once
    plain = sum(t.numel() * t.element_size() for t in tensors)
    head = 4 * sum(p.numel() for p in attach_gaussian_branch(giant).gs_head.parameters())
    assert loaded_bytes("da3-giant") == plain + head


def test_gaussians_run_only_when_asked(gs_net, small_snapshot):
    with torch.no_grad():
        out = gs_net(images(), gaussians=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = gs_net(images(), gaussians=True)
    gaussians = out.gaussians
    assert gaussians.means.shape == (1, 2, 42, 56, 3)
    assert gaussians.rotations.shape == (1, 2, 42, 56, 4)
    assert gaussians.harmonics.shape == (1, 2, 42, 56, 3, 9)
    for field in FIELDS:
        assert torch.isfinite(getattr(gaussians, field)).all(), field
        assert getattr(mixed.gaussians, field).dtype == torch.float32, field
    assert ((gaussians.opacities > 0) & (gaussians.opacities < 1)).all()
    torch.testing.assert_close(gaussians.rotations.norm(dim=-1), torch.ones(1, 2, 42, 56))
    _, plain = load_network(small_snapshot)
    with pytest.raises(ValueError, match="no 3D-Gaussian head"):
        plain(images(), gaussians=True)


def test_adapter_places_pixels_on_their_rays():
    """Raw output with no offsets, scale logits 0 and the rotation channels of the identity:
    each Gaussian sits at `depth` along its pixel centre's ray, turned like the camera, sized
    half the scale range times its pixel footprint at that distance."""
    height, width, d_in = 3, 4, 37
    extrinsics = random_extrinsics(2, seed=8)[None]
    intrinsics = torch.tensor([[5.0, 0, 2.2], [0, 4.0, 1.4], [0, 0, 1]]).expand(1, 2, 3, 3)
    depth = 1 + torch.rand(1, 2, height, width, generator=torch.Generator().manual_seed(9))
    raw = torch.zeros(1, 2, height, width, d_in)
    raw[..., 7] = 1.0  # rotation channels (0, 0, 1, 0): the identity in the release's order
    adapter = GaussianAdapter()
    maps = adapter(extrinsics, intrinsics, depth, torch.full_like(depth, 0.5), raw)

    rotation, translation = extrinsics[..., None, None, :3, :3], extrinsics[..., None, None, :, 3]
    camera = (rotation @ maps.means[..., None])[..., 0] + translation
    torch.testing.assert_close(camera.norm(dim=-1), depth)
    pixels = (intrinsics[..., None, None, :, :] @ camera[..., None])[..., 0]
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    torch.testing.assert_close(pixels[..., 0] / pixels[..., 2], xs.expand(1, 2, -1, -1))
    torch.testing.assert_close(pixels[..., 1] / pixels[..., 2], ys.expand(1, 2, -1, -1))
    footprint = 0.1 * (1 / 5.0 + 1 / 4.0) * depth
    half = adapter.scale_min + (adapter.scale_max - adapter.scale_min) / 2
    torch.testing.assert_close(maps.scales, (half * footprint)[..., None].expand(-1, -1, -1, -1, 3))
    # The camera-to-world rotation, its components in (x, y, z, w) order: the reference's
    # convention (which renderers, the training one included, read as w, x, y, z).
    world = quaternion_to_rotation(maps.rotations)
    torch.testing.assert_close(world, rotation.mT.expand_as(world))
    assert torch.equal(maps.opacities, torch.full_like(depth, 0.5))


def tiny_metric_net() -> DepthAnything3Net:
    """A monocular ViT-S network with depth and sky heads (randomly initialised)."""
    torch.manual_seed(0)
    backbone = DinoV2("vits", [5, 7, 9, 11], cat_token=False)
    return DepthAnything3Net(backbone, DPT(384, features=64, out_channels=[48, 96, 192, 384]))


def test_nested_model_scales_gaussians_like_depth(gs_net):
    nested = NestedDepthAnything3Net(gs_net, tiny_metric_net().eval())
    assert nested.has_gaussians
    with torch.no_grad():
        anyview = gs_net(images(), gaussians=True)
        metric = nested(images(), gaussians=True)
    scale = metric.extrinsics[0, 1, :3, 3] / anyview.extrinsics[0, 1, :3, 3]
    torch.testing.assert_close(scale, scale[:1].expand(3))
    assert not torch.allclose(scale, torch.ones(3))
    torch.testing.assert_close(metric.gaussians.means, anyview.gaussians.means * scale[0])
    torch.testing.assert_close(metric.gaussians.scales, anyview.gaussians.scales * scale[0])
    for field in ("rotations", "opacities", "harmonics"):
        assert torch.equal(getattr(metric.gaussians, field), getattr(anyview.gaussians, field))


def random_maps(views: int, seed: int) -> GaussianMaps:
    gen = torch.Generator().manual_seed(seed)
    quat = torch.nn.functional.normalize(torch.randn(views, 3, 4, 4, generator=gen), dim=-1)
    return GaussianMaps(
        means=torch.randn(views, 3, 4, 3, generator=gen),
        scales=torch.rand(views, 3, 4, 3, generator=gen),
        rotations=quat,
        opacities=torch.rand(views, 3, 4, generator=gen),
        harmonics=torch.randn(views, 3, 4, 3, 9, generator=gen),
    )


def random_extrinsics(views: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rotation = quaternion_to_rotation(torch.randn(views, 4, generator=gen))
    return torch.cat([rotation, torch.randn(views, 3, 1, generator=gen)], dim=-1)


def test_reframe_keeps_each_gaussian_in_its_camera_frame():
    maps = random_maps(2, seed=4)
    source, target = random_extrinsics(2, seed=5), random_extrinsics(2, seed=6)
    moved = reframe(maps, source, target, scale=2.0)

    def in_camera(means, extrinsics):
        rotation, translation = extrinsics[:, None, None, :3, :3], extrinsics[:, None, None, :, 3]
        return (rotation @ means[..., None])[..., 0] + translation

    torch.testing.assert_close(in_camera(moved.means, target), in_camera(maps.means, source) / 2)
    torch.testing.assert_close(moved.scales, maps.scales / 2)
    # Orientations relative to the camera are kept too.
    before = source[:, None, None, :, :3] @ quaternion_to_rotation(
        maps.rotations[..., [1, 2, 3, 0]]
    )
    after = target[:, None, None, :, :3] @ quaternion_to_rotation(
        moved.rotations[..., [1, 2, 3, 0]]
    )
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(moved.harmonics[..., 0], maps.harmonics[..., 0])  # DC: no turn
    back = reframe(moved, target, source, scale=0.5)
    for field in FIELDS:
        torch.testing.assert_close(getattr(back, field), getattr(maps, field), atol=1e-5, rtol=1e-4)


def test_predictor_returns_gaussians_on_the_network_grid(gs_predictor, small_snapshot):
    prediction = gs_predictor.predict(PHOTOS, process_res=RES, gaussians=True)
    plain = gs_predictor.predict(PHOTOS, process_res=RES)
    assert gs_predictor.supports_gaussians and plain.gaussians is None
    np.testing.assert_array_equal(prediction.depth, plain.depth)
    width, height = processing_size(1208, 680, RES)
    gaussians = prediction.gaussians
    assert gaussians.means.shape == (2, height, width, 3) and len(gaussians) == 2 * height * width
    assert gaussians.colors.shape == (2, height, width, 3)
    assert gaussians.opacities.shape == (2, height, width)
    assert all(getattr(gaussians, f).dtype == np.float32 for f in ("means", "colors", "scales"))
    # The network's Gaussians, moved with its cameras into the prediction's world (the first
    # view's camera frame): each keeps its place in its own view's camera frame.
    batch = to_network_input([load_rgb(path)[0] for path in PHOTOS], (width, height))
    with torch.no_grad():
        out = gs_predictor.network(batch, gaussians=True)
    np.testing.assert_allclose(prediction.extrinsics[0], np.eye(4)[:3], atol=1e-6)
    for view in range(2):
        ours = gaussians.means[view] @ prediction.extrinsics[view, :, :3].T
        ours += prediction.extrinsics[view, :, 3]
        network = out.gaussians.means[0, view] @ out.extrinsics[0, view, :, :3].T
        network += out.extrinsics[0, view, :, 3]
        np.testing.assert_allclose(ours, network.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gaussians.scales, out.gaussians.scales[0].numpy(), rtol=1e-5)
    # A 3DGS PLY of them reads back with one vertex per Gaussian.
    ply = PlyData.read(io.BytesIO(gaussians_ply(gaussians, comments=["units relative"])))
    assert ply["vertex"].count == len(gaussians)
    np.testing.assert_allclose(ply["vertex"]["x"], gaussians.means[..., 0].reshape(-1))

    without = Predictor.from_pretrained(small_snapshot, device="cpu")
    assert not without.supports_gaussians
    with pytest.raises(ValueError, match="has no 3D-Gaussian head"):
        without.predict(PHOTOS, process_res=RES, gaussians=True)


def test_gaussians_follow_given_poses(gs_predictor):
    """Poses B = poses A seen from a world rotated, shifted and scaled by 2.5: the network sees
    the same normalised cameras, so depth and Gaussians of B are those of A in B's world."""
    views = [*PHOTOS, IMAGES / "soh-000.png"]  # 3 views: the pose normalisation keeps scale
    intrinsics = np.array([[900.0, 0, 604], [0, 900.0, 340], [0, 0, 1]])
    poses_a = np.tile(np.eye(4), (3, 1, 1))
    poses_a[:, :3, :4] = random_extrinsics(3, seed=7).double().numpy()
    turn = quaternion_to_rotation(torch.tensor([0.3, -0.2, 0.5, 0.8])).double().numpy()
    shift, factor = np.array([1.0, -2.0, 0.5]), 2.5
    poses_b = poses_a.copy()  # X_b = factor turn X_a + shift
    poses_b[:, :3, :3] = poses_a[:, :3, :3] @ turn.T
    poses_b[:, :3, 3] = factor * poses_a[:, :3, 3] - poses_b[:, :3, :3] @ shift

    a, b = (
        gs_predictor.predict(
            views, process_res=RES, intrinsics=intrinsics, extrinsics=p, gaussians=True
        )
        for p in (poses_a, poses_b)
    )
    np.testing.assert_allclose(b.depth, factor * a.depth, rtol=1e-3)
    ga, gb = a.gaussians, b.gaussians
    expected_means = factor * ga.means @ turn.T + shift
    np.testing.assert_allclose(gb.means, expected_means, rtol=1e-3, atol=1e-3 * factor)
    np.testing.assert_allclose(gb.scales, factor * ga.scales, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(gb.opacities, ga.opacities, rtol=1e-4)
    np.testing.assert_allclose(gb.colors, ga.colors, rtol=1e-4, atol=1e-5)
    displayed = quaternion_to_rotation(torch.from_numpy(ga.rotations[..., [1, 2, 3, 0]]))
    turned = torch.from_numpy(turn).float() @ displayed  # read as (w, x, y, z), turned
    expected_quat = rotation_to_quaternion(turned)[..., [3, 0, 1, 2]].numpy()
    sign = np.sign((expected_quat * gb.rotations).sum(-1, keepdims=True))
    np.testing.assert_allclose(gb.rotations * sign, expected_quat, atol=1e-3)
    # The view-dependent colour (degrees 1 and 2) turns with the world: B seen along turn d is A
    # seen along d.
    directions = torch.nn.functional.normalize(torch.randn(16, 3, dtype=torch.float64), dim=-1)
    seen_a = spherical_harmonics.basis(directions)[:, 1:]  # (16, 8)
    seen_b = spherical_harmonics.basis(directions @ torch.from_numpy(turn).T)[:, 1:]
    colour_a = np.einsum("...ck,dk->...cd", ga.sh_rest.astype(np.float64), seen_a.numpy())
    colour_b = np.einsum("...ck,dk->...cd", gb.sh_rest.astype(np.float64), seen_b.numpy())
    assert np.abs(colour_a).max() > 1e-3
    np.testing.assert_allclose(colour_b, colour_a, atol=1e-3 * np.abs(colour_a).max())
