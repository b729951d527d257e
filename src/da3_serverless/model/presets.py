"""One builder per released DA3 network, with the architecture of the official configs.

``build_network(preset)`` returns the network in eval mode (fp32, on the current default
device: CPU, or ``meta`` under ``with torch.device("meta")`` when weights come from a file).
The 3D-Gaussian branch is not part of any preset: `attach_gaussian_branch` adds it to an any-view
network (the loader does so when a checkpoint holds its weights).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from da3_serverless.model.camera import CameraDec, CameraEnc
from da3_serverless.model.dpt import DPT, DualDPT
from da3_serverless.model.gaussian_head import GaussianHead
from da3_serverless.model.gaussians import GaussianAdapter
from da3_serverless.model.net import DepthAnything3Net, NestedDepthAnything3Net
from da3_serverless.model.vit import DinoV2


def _anyview(
    *,
    vit: str,
    dim: int,
    out_layers: list[int],
    alt_start: int,
    features: int,
    out_channels: list[int],
) -> DepthAnything3Net:
    """Multi-view network: depth + confidence + camera (decoder, encoder for given cameras).

    The head and camera decoder see twice the ViT width (local and global tokens concatenated).
    """
    backbone = DinoV2(
        vit,
        out_layers,
        alt_start=alt_start,
        qknorm_start=alt_start,
        rope_start=alt_start,
        cat_token=True,
    )
    head = DualDPT(2 * dim, output_dim=2, features=features, out_channels=out_channels)
    return DepthAnything3Net(backbone, head, cam_dec=CameraDec(2 * dim), cam_enc=CameraEnc(dim))


def _monocular_large() -> DepthAnything3Net:
    """Single-view ViT-L network: depth + sky (the mono and metric releases share it)."""
    backbone = DinoV2("vitl", [4, 11, 17, 23], cat_token=False)
    head = DPT(1024, output_dim=1, features=256, out_channels=[256, 512, 1024, 1024])
    return DepthAnything3Net(backbone, head)


def da3_small() -> DepthAnything3Net:
    return _anyview(
        vit="vits", dim=384, out_layers=[5, 7, 9, 11], alt_start=4,
        features=64, out_channels=[48, 96, 192, 384],
    )  # fmt: skip


def da3_base() -> DepthAnything3Net:
    return _anyview(
        vit="vitb", dim=768, out_layers=[5, 7, 9, 11], alt_start=4,
        features=128, out_channels=[96, 192, 384, 768],
    )  # fmt: skip


def da3_large() -> DepthAnything3Net:
    return _anyview(
        vit="vitl", dim=1024, out_layers=[11, 15, 19, 23], alt_start=8,
        features=256, out_channels=[256, 512, 1024, 1024],
    )  # fmt: skip


def da3_giant() -> DepthAnything3Net:
    # The release also has a 3D-Gaussian head: see attach_gaussian_branch.
    return _anyview(
        vit="vitg", dim=1536, out_layers=[19, 27, 33, 39], alt_start=13,
        features=256, out_channels=[256, 512, 1024, 1024],
    )  # fmt: skip


def da3mono_large() -> DepthAnything3Net:
    return _monocular_large()


def da3metric_large() -> DepthAnything3Net:
    return _monocular_large()


def da3nested_giant_large() -> NestedDepthAnything3Net:
    return NestedDepthAnything3Net(da3_giant(), da3metric_large())


def da3_small_metric_pair() -> NestedDepthAnything3Net:
    return NestedDepthAnything3Net(da3_small(), da3metric_large())


def da3_base_metric_pair() -> NestedDepthAnything3Net:
    return NestedDepthAnything3Net(da3_base(), da3metric_large())


PRESETS: dict[str, Callable[[], nn.Module]] = {
    "da3-small": da3_small,
    "da3-base": da3_base,
    "da3-large": da3_large,
    "da3-giant": da3_giant,
    "da3mono-large": da3mono_large,
    "da3metric-large": da3metric_large,
    "da3nested-giant-large": da3nested_giant_large,
}
# Two releases loaded side by side (inference/catalog.py: `parts`, `checkpoint.load_pair`),
# never one snapshot: buildable (for their memory), not a snapshot's `model_name`.
PAIRS: dict[str, Callable[[], nn.Module]] = {
    "da3-small+da3metric-large": da3_small_metric_pair,
    "da3-base+da3metric-large": da3_base_metric_pair,
}


# Presets whose official snapshots hold the 3D-Gaussian head (for writing look-alike test
# snapshots; loading decides from the checkpoint's keys, not from this list).
GAUSSIAN_RELEASES = frozenset({"da3-giant", "da3nested-giant-large"})


def attach_gaussian_branch(net: nn.Module) -> DepthAnything3Net:
    """Add the 3D-Gaussian head and adapter (release configuration) to an any-view network, or
    to the any-view branch of a nested one; returns the network that got them.

    The head mirrors the depth head's pyramid (input width, features, channels per level); its
    output is the adapter's raw channels plus a density. ValueError for networks without
    predicted cameras (the Gaussians are placed with them).
    """
    target = net.da3 if isinstance(net, NestedDepthAnything3Net) else net
    if not isinstance(target, DepthAnything3Net) or not isinstance(target.head, DualDPT):
        raise ValueError("only any-view networks (with a camera decoder) take a 3D-Gaussian head")
    depth_head = target.head
    adapter = GaussianAdapter()
    target.gs_adapter = adapter
    target.gs_head = GaussianHead(
        depth_head.projects[0].in_channels,
        output_dim=adapter.d_in + 1,
        features=depth_head.scratch.layer1_rn.out_channels,
        out_channels=[project.out_channels for project in depth_head.projects],
    )
    target.gs_head.eval()
    return target


def build_network(preset: str) -> nn.Module:
    """The network of ``preset`` (a key of PRESETS, or of PAIRS) with its default init, in
    eval mode."""
    builder = PRESETS.get(preset) or PAIRS.get(preset)
    if builder is None:
        raise ValueError(f"unknown DA3 preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return builder().eval()
