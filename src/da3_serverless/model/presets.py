"""One builder per released DA3 network, with the architecture of the official configs.

``build_network(preset)`` returns the network in eval mode (fp32, on the current default
device: CPU, or ``meta`` under ``with torch.device("meta")`` when weights come from a file).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from da3_serverless.model.camera import CameraDec, CameraEnc
from da3_serverless.model.dpt import DPT, DualDPT
from da3_serverless.model.net import DepthAnything3Net, NestedDepthAnything3Net
from da3_serverless.model.vit import DinoV2


def _anyview(
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
    _share_ray_norm(head)
    return DepthAnything3Net(backbone, head, cam_dec=CameraDec(2 * dim), cam_enc=CameraEnc(dim))


def _share_ray_norm(head: DualDPT) -> None:
    """Use one LayerNorm in every level's ray output branch, as the released networks do (their
    files store it once, under the first level's name)."""
    branches = head.scratch.output_conv2_aux
    for branch in branches[1:]:
        branch[2] = branches[0][2]


def _monocular_large() -> DepthAnything3Net:
    """Single-view ViT-L network: depth + sky (the mono and metric releases share it)."""
    backbone = DinoV2("vitl", [4, 11, 17, 23], cat_token=False)
    head = DPT(1024, output_dim=1, features=256, out_channels=[256, 512, 1024, 1024])
    return DepthAnything3Net(backbone, head)


def da3_small() -> DepthAnything3Net:
    return _anyview("vits", 384, [5, 7, 9, 11], 4, 64, [48, 96, 192, 384])


def da3_base() -> DepthAnything3Net:
    return _anyview("vitb", 768, [5, 7, 9, 11], 4, 128, [96, 192, 384, 768])


def da3_large() -> DepthAnything3Net:
    return _anyview("vitl", 1024, [11, 15, 19, 23], 8, 256, [256, 512, 1024, 1024])


def da3_giant() -> DepthAnything3Net:
    # The release also has a 3D-Gaussian head; it is not built (checkpoint keys are skipped).
    return _anyview("vitg", 1536, [19, 27, 33, 39], 13, 256, [256, 512, 1024, 1024])


def da3mono_large() -> DepthAnything3Net:
    return _monocular_large()


def da3metric_large() -> DepthAnything3Net:
    return _monocular_large()


def da3nested_giant_large() -> NestedDepthAnything3Net:
    return NestedDepthAnything3Net(da3_giant(), da3metric_large())


PRESETS: dict[str, Callable[[], nn.Module]] = {
    "da3-small": da3_small,
    "da3-base": da3_base,
    "da3-large": da3_large,
    "da3-giant": da3_giant,
    "da3mono-large": da3mono_large,
    "da3metric-large": da3metric_large,
    "da3nested-giant-large": da3nested_giant_large,
}


def build_network(preset: str) -> nn.Module:
    """The network of ``preset`` (a key of PRESETS) with its default init, in eval mode."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DA3 preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[preset]().eval()
