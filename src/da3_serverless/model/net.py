"""The DA3 networks: backbone + dense head + cameras, and the nested metric network.

Both take ImageNet-normalised views ``images`` (B, N, 3, H, W), H and W multiples of 14, and
return a ``NetOutput``. Under ``torch.autocast`` only the backbone runs in low precision; the
camera encoder, heads, camera decoding and post-processing run in fp32. With ``gaussians=True``
a network that has the 3D-Gaussian branch (``gs_head`` + ``gs_adapter``, attached when the
checkpoint holds it) also returns one Gaussian per pixel per view. ``check``, a callable
that raises to stop the forward (a cancelled job), is called between the backbone's blocks and
before each head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from da3_serverless.model.alignment import align_to_metric, mono_sky_fill
from da3_serverless.model.camera import camera_from_pose_encoding, invert_rigid
from da3_serverless.model.dpt import DualDPT
from da3_serverless.model.gaussians import GaussianMaps
from da3_serverless.model.layers import stop_point
from da3_serverless.model.rays import pose_from_rays
from da3_serverless.model.rng import per_sample_generators
from da3_serverless.model.vit import PATCH_SIZE


@dataclass
class NetOutput:
    """Network predictions at the input resolution, B batch, N views.

    depth (B, N, H, W); confidence (B, N, H, W) or None; sky probability (B, N, H, W) or None;
    extrinsics (B, N, 3, 4) world-to-camera or None; intrinsics (B, N, 3, 3) in pixels or None;
    is_metric: depth is in meters; gaussians: (B, N, H, W, ...) 3D Gaussians in the frame and
    units of depth and extrinsics, when asked for; metric_scale (B,): the nested model's scale
    from its any-view branch to metres, per sample (None for the other networks).
    """

    depth: torch.Tensor
    confidence: torch.Tensor | None = None
    sky: torch.Tensor | None = None
    extrinsics: torch.Tensor | None = None
    intrinsics: torch.Tensor | None = None
    is_metric: bool = False
    gaussians: GaussianMaps | None = None
    metric_scale: torch.Tensor | None = None


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


class DepthAnything3Net(nn.Module):
    """Backbone + dense head, with optional camera decoder/encoder (any-view models).

    Submodule names (backbone, head, cam_dec, cam_enc, gs_head, gs_adapter) are those of the
    checkpoints. The 3D-Gaussian branch is attached after construction
    (`presets.attach_gaussian_branch`), only when a checkpoint holds it.
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
        self.gs_head = None
        self.gs_adapter = None

    @property
    def has_gaussians(self) -> bool:
        """Whether the network has the 3D-Gaussian branch."""
        return self.gs_head is not None

    def forward(
        self,
        images: torch.Tensor,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        *,
        use_ray_pose: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        gaussians: bool = False,
        check: Callable[[], None] | None = None,
    ) -> NetOutput:
        """images (B, N, 3, H, W); extrinsics (B, N, 4, 4) world-to-camera and intrinsics
        (B, N, 3, 3) pixels of known cameras (both or neither); use_ray_pose: cameras from the
        predicted ray map instead of the camera decoder. Each batch sample is its own scene,
        post-processed on its own. ``generator``: one per sample for the random sampling of
        post-processing (default: fresh seeded ones, so results are repeatable).
        gaussians: also run the 3D-Gaussian branch (built on the predicted depth and cameras).
        ``check`` raises to stop the forward (see the module's docstring).
        """
        check_inputs(images, extrinsics, intrinsics, self.cam_enc is not None)
        if gaussians and not self.has_gaussians:
            raise ValueError(
                "this network has no 3D-Gaussian head (its checkpoint holds no gs_head weights): "
                "use DA3-GIANT or DA3NESTED-GIANT-LARGE, or leave gaussians off"
            )
        height, width = images.shape[-2:]
        device_type = images.device.type
        generator = per_sample_generators(generator, images.shape[0], images.device)
        cam_token = None
        if extrinsics is not None:
            with torch.autocast(device_type, enabled=False):
                cam_token = self.cam_enc(extrinsics, intrinsics, (height, width))
        feats = self.backbone(images, cam_token, check=check)
        with torch.autocast(device_type, enabled=False):
            if isinstance(self.head, DualDPT):
                head = self.head(
                    feats, height, width, patch_start_idx=0, compute_rays=use_ray_pose, check=check
                )
            else:
                head = self.head(feats, height, width, patch_start_idx=0, check=check)
            if check is not None:
                stop_point(check)
            out = NetOutput(depth=head["depth"], confidence=head.get("depth_conf"))
            if self.cam_dec is not None and use_ray_pose:
                out.extrinsics, out.intrinsics = pose_from_rays(
                    head["ray"], head["ray_conf"], (height, width), generator=generator
                )
            elif self.cam_dec is not None:
                encoding = self.cam_dec(feats[-1][1])
                cam_to_world, out.intrinsics = camera_from_pose_encoding(encoding, (height, width))
                out.extrinsics = invert_rigid(cam_to_world)
            if gaussians:
                out.gaussians = self._gaussians(feats, images, out, check)
            if "sky" in head:
                out.sky = head["sky"]
                out.depth = mono_sky_fill(out.depth, out.sky)
        return out

    def _gaussians(
        self,
        feats: list,
        images: torch.Tensor,
        out: NetOutput,
        check: Callable[[], None] | None = None,
    ) -> GaussianMaps:
        """The Gaussian head on the backbone features and input images, placed in the world by
        the adapter with the predicted depth (before any sky fill) and cameras."""
        if check is not None:
            stop_point(check)
        height, width = images.shape[-2:]
        raw = self.gs_head(feats, height, width, patch_start_idx=0, images=images)
        return self.gs_adapter(
            out.extrinsics, out.intrinsics, out.depth, raw["raw_gs_conf"], raw["raw_gs"]
        )


class NestedDepthAnything3Net(nn.Module):
    """Any-view network (``da3``) brought to metric scale by a metric network (``da3_metric``).

    The any-view depth and camera translations are scaled by a least-squares fit to the metric
    depth (converted with the any-view intrinsics) on confident non-sky pixels; sky pixels get
    the far end of the scene and confidence 1. ``sky`` is the metric network's.

    Gaussians (from the any-view branch) are scaled by the same factor as depth and camera
    translations, so they overlay the metric scene; the reference leaves them unscaled.
    """

    def __init__(self, da3: DepthAnything3Net, da3_metric: DepthAnything3Net) -> None:
        super().__init__()
        self.da3 = da3
        self.da3_metric = da3_metric

    @property
    def has_gaussians(self) -> bool:
        """Whether the any-view branch has the 3D-Gaussian branch."""
        return self.da3.has_gaussians

    def forward(
        self,
        images: torch.Tensor,
        extrinsics: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        *,
        use_ray_pose: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        gaussians: bool = False,
        check: Callable[[], None] | None = None,
    ) -> NetOutput:
        """Same arguments as DepthAnything3Net.forward; depth in meters."""
        out = self.da3(
            images,
            extrinsics,
            intrinsics,
            use_ray_pose=use_ray_pose,
            generator=generator,
            gaussians=gaussians,
            check=check,
        )
        metric = self.da3_metric(images, check=check)  # draws nothing: no ray pose
        with torch.autocast(images.device.type, enabled=False):
            aligned = align_to_metric(
                out.depth,
                out.confidence,
                out.extrinsics,
                out.intrinsics,
                metric.depth,
                metric.sky,
            )
        gaussians_m = None
        if out.gaussians is not None:  # each sample's Gaussians by its own scale
            gaussians_m = out.gaussians.scaled(aligned.scale.view(-1, 1, 1, 1, 1))
        return NetOutput(
            depth=aligned.depth,
            confidence=aligned.depth_conf,
            sky=metric.sky,
            extrinsics=aligned.extrinsics,
            intrinsics=out.intrinsics,
            is_metric=True,
            gaussians=gaussians_m,
            metric_scale=aligned.scale,
        )
