"""Parity of the 3D-Gaussian branch with the reference implementation (its `infer_gs=True` path).

The head is built as `presets.attach_gaussian_branch` builds it on da3-small (small and fast;
the release's da3-giant configuration is compared in test_model_parity.py, marked slow) and gets
the reference's randomised weights through a strict state-dict load; the adapter has no weights.
Both run the same small random inputs in fp32; outputs agree to 1e-4 relative. The reference
rotates spherical harmonics with e3nn (a test requirement); ours does not need it.
"""

from __future__ import annotations

import torch
from depth_anything_3.model.gsdpt import GSDPT as RefGSDPT
from depth_anything_3.model.utils.transform import quat_to_mat
from depth_anything_3.utils.geometry import map_pdf_to_opacity
from depth_anything_3.utils.sh_helpers import rotate_sh

from da3_serverless.model import spherical_harmonics
from da3_serverless.model.camera import quaternion_to_rotation
from da3_serverless.model.gaussian_head import GaussianHead
from da3_serverless.model.gaussians import GaussianAdapter
from reference import assert_close, randomized, reference_module

# Imports the trajectory package `evo` (absent): through the placeholders of reference.py.
RefGaussianAdapter = reference_module("depth_anything_3.model.gs_adapter").GaussianAdapter

# The depth head's pyramid of da3-small, which the Gaussian head mirrors.
DIM_IN, FEATURES, OUT_CHANNELS = 768, 64, [48, 96, 192, 384]
ADAPTER = dict(sh_degree=2, pred_color=False, pred_offset_depth=True, pred_offset_xy=True)


def random_cameras(views: int, size: tuple[int, int], seed: int):
    """World-to-camera (1, views, 4, 4) rigid transforms and pixel intrinsics (1, views, 3, 3)."""
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    ext = torch.eye(4).repeat(1, views, 1, 1)
    ext[0, :, :3, :3] = quat_to_mat(torch.randn(views, 4, generator=gen))
    ext[0, :, :3, 3] = torch.randn(views, 3, generator=gen)
    ixt = torch.zeros(1, views, 3, 3)
    ixt[..., 0, 0] = width * (0.8 + 0.4 * torch.rand(1, views, generator=gen))
    ixt[..., 1, 1] = height * (0.8 + 0.4 * torch.rand(1, views, generator=gen))
    ixt[..., 0, 2], ixt[..., 1, 2], ixt[..., 2, 2] = width / 2, height / 2, 1.0
    return ext, ixt


def test_gaussian_head_matches_reference() -> None:
    torch.manual_seed(0)
    ref = RefGSDPT(dim_in=DIM_IN, output_dim=38, features=FEATURES, out_channels=OUT_CHANNELS)
    ref = randomized(ref, 0)
    ours = GaussianHead(DIM_IN, output_dim=38, features=FEATURES, out_channels=OUT_CHANNELS)
    ours.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(1)
    views, (p, q) = 2, (2, 3)
    feats = [
        (
            torch.randn(1, views, p * q, DIM_IN, generator=gen),
            torch.randn(1, views, DIM_IN, generator=gen),
        )
        for _ in range(4)
    ]
    H, W = p * 14, q * 14
    images = torch.randn(1, views, 3, H, W, generator=gen)
    with torch.no_grad():
        expected = ref(feats, H, W, patch_start_idx=0, images=images)
        expected_one_by_one = ref(feats, H, W, patch_start_idx=0, images=images, chunk_size=1)
        got = ours.eval()(feats, H, W, patch_start_idx=0, images=images)
        one_by_one = ours(feats, H, W, patch_start_idx=0, images=images, chunk_size=1)
        from_bf16 = ours([(t.bfloat16(), c) for t, c in feats], H, W, 0, images=images)

    assert set(got) == {"raw_gs", "raw_gs_conf"}
    assert got["raw_gs"].shape == (1, views, H, W, 37)
    assert got["raw_gs_conf"].shape == (1, views, H, W)
    for key in got:
        assert_close(got[key], expected[key])
        # fp32 sums depend on the batch size of the convolutions, the same way in both.
        assert_close(one_by_one[key], expected_one_by_one[key])
        assert from_bf16[key].dtype == torch.float32


def adapter_inputs(views: int = 2, size: tuple[int, int] = (6, 8), seed: int = 2):
    ext, ixt = random_cameras(views, size, seed)
    gen = torch.Generator().manual_seed(seed)
    depth = 2.0 + torch.rand(1, views, *size, generator=gen)
    density = torch.rand(1, views, *size, generator=gen)
    raw = torch.randn(1, views, *size, 37, generator=gen)
    return ext, ixt, depth, density, raw


def test_gaussian_adapter_matches_reference() -> None:
    ext, ixt, depth, density, raw = adapter_inputs()
    size = tuple(depth.shape[-2:])
    ref = RefGaussianAdapter(**ADAPTER).eval()
    ours = GaussianAdapter().eval()
    assert ours.d_in == ref.d_in == 37
    assert not list(ours.state_dict()) and not list(ref.state_dict())  # nothing stored
    with torch.no_grad():
        expected = ref(ext, ixt, depth, map_pdf_to_opacity(density), raw, image_shape=size)
        got = ours(ext[:, :, :3], ixt, depth, density, raw)

    assert got.means.shape == (1, 2, *size, 3)
    assert got.harmonics.shape == (1, 2, *size, 3, 9)
    for field in ("means", "scales", "rotations", "harmonics", "opacities"):
        assert_close(getattr(got, field).flatten(1, 3), getattr(expected, field))
    # Unit quaternions; the inputs were left untouched.
    torch.testing.assert_close(got.rotations.norm(dim=-1), torch.ones(1, 2, *size))
    assert torch.equal(ixt, random_cameras(2, size, 2)[1])


def test_sh_rotation_matches_reference_and_rotates_the_function() -> None:
    gen = torch.Generator().manual_seed(3)
    rotations = quaternion_to_rotation(torch.randn(64, 4, generator=gen))
    coefficients = torch.randn(64, 3, 9, generator=gen)
    got = spherical_harmonics.rotate(coefficients, rotations)  # one rotation per 3 channels
    assert_close(got, rotate_sh(coefficients, rotations[:, None]))
    # f'(d) = f(R^T d) at random directions, degree by degree.
    directions = torch.nn.functional.normalize(torch.randn(64, 50, 3, generator=gen), dim=-1)
    turned = directions @ rotations  # R^T d
    for n in (1, 4, 9):
        c = coefficients[:, 0, :n]
        rotated = spherical_harmonics.rotate(c[:, None], rotations)[:, 0]
        at_d = (spherical_harmonics.basis(directions)[..., :n] * rotated[:, None]).sum(-1)
        at_turned = (spherical_harmonics.basis(turned)[..., :n] * c[:, None]).sum(-1)
        torch.testing.assert_close(at_d, at_turned, rtol=1e-5, atol=1e-5)
