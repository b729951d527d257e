"""Parity of the DA3 heads and camera components with the reference implementation.

Each component is built with the reference config values of a real preset, both copies get the
same seeded random weights (ours loads the reference's state dict strictly, which also proves the
key names match) and the same small random inputs; outputs must agree to 1e-4 relative in fp32.
"""

from __future__ import annotations

import pytest
import torch
from depth_anything_3.model.dpt import DPT as RefDPT
from depth_anything_3.model.dualdpt import DualDPT as RefDualDPT

from da3_serverless.model.dpt import DPT, DualDPT

# (dim_in, features, out_channels) of the heads in the reference configs.
DUALDPT_PRESETS = {
    "da3-small": (768, 64, [48, 96, 192, 384]),
    "da3-base": (1536, 128, [96, 192, 384, 768]),
    "da3-large": (2048, 256, [256, 512, 1024, 1024]),
}
DPT_PRESETS = {"da3mono-large": (1024, 256, [256, 512, 1024, 1024])}  # same for da3metric-large


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to 1e-4 relative; entries near zero get an absolute floor of 1e-5 x max |ref|."""
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter with seeded noise so norms, biases and scales are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def copy_into(ours: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


def head_inputs(
    dim_in: int, views: int = 2, grid: tuple[int, int] = (2, 3), seed: int = 1
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int]:
    """4 backbone layers as the network hands them over: (tokens (1, S, p*q, dim_in), cam token)."""
    gen = torch.Generator().manual_seed(seed)
    feats = [
        (
            torch.randn(1, views, grid[0] * grid[1], dim_in, generator=gen),
            torch.randn(1, views, dim_in, generator=gen),
        )
        for _ in range(4)
    ]
    return feats, grid[0] * 14, grid[1] * 14


@pytest.mark.parametrize("preset", sorted(DUALDPT_PRESETS))
def test_dualdpt_matches_reference(preset: str) -> None:
    dim_in, features, out_channels = DUALDPT_PRESETS[preset]
    torch.manual_seed(0)
    ref = randomized(
        RefDualDPT(dim_in=dim_in, output_dim=2, features=features, out_channels=out_channels), 0
    )
    ours = copy_into(
        DualDPT(dim_in=dim_in, output_dim=2, features=features, out_channels=out_channels), ref
    )
    feats, H, W = head_inputs(dim_in)
    with torch.no_grad():
        expected = ref(feats, H, W, patch_start_idx=0)
        got = ours(feats, H, W, patch_start_idx=0)
        no_rays = ours(feats, H, W, patch_start_idx=0, compute_rays=False)
        one_by_one = ours(feats, H, W, patch_start_idx=0, chunk_size=1)

    assert set(got) == {"depth", "depth_conf", "ray", "ray_conf"}
    assert got["depth"].shape == (1, 2, H, W)
    assert got["ray"].shape == (1, 2, 8 * 2, 8 * 3, 6)
    assert got["ray_conf"].shape == (1, 2, 16, 24)
    for key in got:
        assert_close(got[key], expected[key])
        assert_close(one_by_one[key], expected[key])
    assert set(no_rays) == {"depth", "depth_conf"}
    for key in no_rays:
        assert torch.equal(no_rays[key], got[key])


@pytest.mark.parametrize("preset", sorted(DPT_PRESETS))
def test_dpt_matches_reference(preset: str) -> None:
    dim_in, features, out_channels = DPT_PRESETS[preset]
    torch.manual_seed(0)
    ref = randomized(
        RefDPT(dim_in=dim_in, output_dim=1, features=features, out_channels=out_channels), 0
    )
    ours = copy_into(
        DPT(dim_in=dim_in, output_dim=1, features=features, out_channels=out_channels), ref
    )
    feats, H, W = head_inputs(dim_in, grid=(3, 2))
    with torch.no_grad():
        expected = ref(feats, H, W, patch_start_idx=0)
        got = ours(feats, H, W, patch_start_idx=0)

    assert set(got) == {"depth", "sky"}
    assert got["depth"].shape == (1, 2, H, W)
    for key in got:
        assert_close(got[key], expected[key])
