"""The DA3 networks: backbone + dense head + cameras, and the nested metric network.

Both take ImageNet-normalised views ``images`` (B, N, 3, H, W), H and W multiples of 14, and
return a ``NetOutput``. Under ``torch.autocast`` only the backbone runs in low precision; the
camera encoder, heads, camera decoding and post-processing run in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from da3_serverless.model.camera import camera_from_pose_encoding, invert_rigid
from da3_serverless.model.dpt import DualDPT
from da3_serverless.model.vit import PATCH_SIZE

# Sky probability at or above which a pixel counts as sky.
SKY_THRESHOLD = 0.3
# Fewest sky and non-sky pixels for the sky depth fill to be meaningful.
MIN_SKY_PIXELS = 10
# Quantile of non-sky depth given to sky pixels.
SKY_DEPTH_QUANTILE = 0.99
# Most non-sky depths a quantile is computed from (a fixed-seed sample beyond that).
MAX_QUANTILE_SAMPLES = 100_000
SAMPLING_SEED = 0


@dataclass
class NetOutput:
    """Network predictions at the input resolution, B batch, N views.

    depth (B, N, H, W); confidence (B, N, H, W) or None; sky probability (B, N, H, W) or None;
    extrinsics (B, N, 3, 4) world-to-camera or None; intrinsics (B, N, 3, 3) in pixels or None;
    is_metric: depth is in meters.
    """

    depth: torch.Tensor
    confidence: torch.Tensor | None = None
    sky: torch.Tensor | None = None
    extrinsics: torch.Tensor | None = None
    intrinsics: torch.Tensor | None = None
    is_metric: bool = False


def check_inputs(
    images: torch.Tensor,
    extrinsics: torch.Tensor | None,
    intrinsics: torch.Tensor | None,
    takes_cameras: bool,
) -> None:
    """Raise ValueError saying what to fix when the inputs cannot go through the network."""
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(
            f"images must be (batch, views, 3, height, width), got shape {tuple(images.shape)}"
        )
    height, width = images.shape[-2:]
    if height % PATCH_SIZE or width % PATCH_SIZE or height == 0 or width == 0:
        raise ValueError(
            f"image height and width must be positive multiples of {PATCH_SIZE}, got "
            f"{height}x{width}: resize or crop the images first"
        )
    if (extrinsics is None) != (intrinsics is None):
        raise ValueError("give extrinsics and intrinsics together to condition on known cameras")
    if extrinsics is None:
        return
    if not takes_cameras:
        raise ValueError("this network takes no camera input: leave out extrinsics/intrinsics")
    views = tuple(images.shape[:2])
    if extrinsics.shape != (*views, 4, 4):
        raise ValueError(f"extrinsics must be {(*views, 4, 4)}, got {tuple(extrinsics.shape)}")
    if intrinsics.shape != (*views, 3, 3):
        raise ValueError(f"intrinsics must be {(*views, 3, 3)}, got {tuple(intrinsics.shape)}")


def sample_for_quantile(values: torch.Tensor) -> torch.Tensor:
    """values (M,) -> at most MAX_QUANTILE_SAMPLES of them, drawn with a fixed seed so the
    same input always gives the same result."""
    if values.numel() <= MAX_QUANTILE_SAMPLES:
        return values
    gen = torch.Generator(device=values.device).manual_seed(SAMPLING_SEED)
    idx = torch.randint(
        0, values.numel(), (MAX_QUANTILE_SAMPLES,), device=values.device, generator=gen
    )
    return values[idx]


def fill_sky_depth(depth: torch.Tensor, sky: torch.Tensor) -> torch.Tensor:
    """Depth (B, N, H, W) with sky pixels (sky >= 0.3) set to the 99th percentile of the
    non-sky depths, when there are enough of both kinds; else unchanged."""
    non_sky = sky < SKY_THRESHOLD
    if non_sky.sum() <= MIN_SKY_PIXELS or (~non_sky).sum() <= MIN_SKY_PIXELS:
        return depth
    far = torch.quantile(sample_for_quantile(depth[non_sky]), SKY_DEPTH_QUANTILE)
    return torch.where(non_sky, depth, far)


class DepthAnything3Net(nn.Module):
    """Backbone + dense head, with optional camera decoder/encoder (any-view models).

    Submodule names (backbone, head, cam_dec, cam_enc) are those of the checkpoints.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        cam_dec: nn.Module | None = None,
        cam_enc: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cam_dec = cam_dec
        self.cam_enc = cam_enc

    def forward(
        self,
        images: torch.Tensor,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        *,
        use_ray_pose: bool = False,
    ) -> NetOutput:
        """images (B, N, 3, H, W); extrinsics (B, N, 4, 4) world-to-camera and intrinsics
        (B, N, 3, 3) pixels of known cameras (both or neither); use_ray_pose: cameras from the
        predicted ray map instead of the camera decoder."""
        out = self.predict(images, extrinsics, intrinsics, use_ray_pose=use_ray_pose)
        if out.sky is not None:
            out.depth = fill_sky_depth(out.depth, out.sky)
        return out

    def predict(
        self,
        images: torch.Tensor,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        *,
        use_ray_pose: bool = False,
    ) -> NetOutput:
        """forward without the sky depth fill (raw head depth)."""
        check_inputs(images, extrinsics, intrinsics, self.cam_enc is not None)
        if use_ray_pose:
            raise ValueError("use_ray_pose is not supported yet")
        height, width = images.shape[-2:]
        device_type = images.device.type
        cam_token = None
        if extrinsics is not None:
            with torch.autocast(device_type, enabled=False):
                cam_token = self.cam_enc(extrinsics, intrinsics, (height, width))
        feats = self.backbone(images, cam_token)
        with torch.autocast(device_type, enabled=False):
            if isinstance(self.head, DualDPT):
                rays = use_ray_pose and self.cam_dec is not None
                head = self.head(feats, height, width, patch_start_idx=0, compute_rays=rays)
            else:
                head = self.head(feats, height, width, patch_start_idx=0)
            out = NetOutput(depth=head["depth"], confidence=head.get("depth_conf"))
            out.sky = head.get("sky")
            if self.cam_dec is not None:
                if use_ray_pose:
                    out.extrinsics, out.intrinsics = self._ray_cameras(head, height, width)
                else:
                    encoding = self.cam_dec(feats[-1][1])
                    cam_to_world, out.intrinsics = camera_from_pose_encoding(
                        encoding, (height, width)
                    )
                    out.extrinsics = invert_rigid(cam_to_world)
        return out
