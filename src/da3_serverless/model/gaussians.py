"""3D Gaussians from the Gaussian head: the adapter to world space, and frame changes.

`GaussianAdapter` (`gs_adapter` of the giant releases; it has no stored tensors) turns the raw
per-pixel output of `model/gaussian_head.py` into one world-space Gaussian per pixel per view,
using the depth and cameras the network predicted (not given ones: the depth lives in the
predicted cameras' frame). Its arithmetic follows the reference implementation exactly, the
trained head was fitted through it:

- mean: the pixel centre, shifted by the predicted sub-pixel offset, is cast as a ray through
  the camera; the Gaussian sits at (depth + predicted depth offset) along the unit ray.
- scale: a predicted fraction in [1e-5, 30] of the pixel footprint (0.1 (1/fx + 1/fy) x depth).
- rotation: the head's four rotation channels, normalised, composed with the camera-to-world
  rotation, with the reference's component order (so the result is a quaternion w, x, y, z as
  3DGS viewers read it and as the head's training renderer read it).
- colour: spherical-harmonic coefficients (degree 2, higher bands damped by 0.1 x 0.25^l),
  rotated from the camera to the world frame.
- opacity: the head's density (sigmoid).

Shapes: B batch, S views, H x W pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from da3_serverless.model import spherical_harmonics
from da3_serverless.model.camera import invert_rigid, rotation_to_quaternion

# Release configuration of the adapter (da3-giant and the nested model's any-view branch).
SH_DEGREE = 2
SCALE_MIN, SCALE_MAX = 1e-5, 30.0
# Pixel footprint multiplier of the scales, and the epsilon of the quaternion normalisation.
_FOOTPRINT = 0.1
_QUAT_EPS = 1e-8


@dataclass
class GaussianMaps:
    """One 3D Gaussian per pixel per view, in the world frame and units of the cameras.

    means (..., H, W, 3); scales (..., H, W, 3) standard deviations along the Gaussian's axes;
    rotations (..., H, W, 4) unit quaternions (w, x, y, z); opacities (..., H, W) in (0, 1);
    harmonics (..., H, W, 3, n) spherical-harmonic coefficients per colour channel in the
    world frame (`spherical_harmonics` basis; colour = 0.5 + SH_C0 x harmonics[..., 0]).
    Leading dimensions are (B, S) from the network, (S,) for one batch entry.
    """

    means: torch.Tensor
    scales: torch.Tensor
    rotations: torch.Tensor
    opacities: torch.Tensor
    harmonics: torch.Tensor

    def scaled(self, factor: float | torch.Tensor) -> GaussianMaps:
        """The same Gaussians in a world scaled by `factor` about its origin (means and scales
        times factor), e.g. when depth and camera translations are brought to meters."""
        return replace(self, means=self.means * factor, scales=self.scales * factor)

    def entry(self, sample: int) -> GaussianMaps:
        """Batch entry `sample` of network-shaped (B, S, ...) maps, as (S, ...) maps."""
        return GaussianMaps(*(getattr(self, name)[sample] for name in _FIELDS))


_FIELDS = ("means", "scales", "rotations", "opacities", "harmonics")


class GaussianAdapter(nn.Module):
    """Raw head output + predicted depth and cameras -> world-space `GaussianMaps`.

    Raw channels (d_in = 2 + 3 + 4 + 3 n + 1, n = (sh_degree + 1)^2): sub-pixel offset (x, y),
    scale logits (3), rotation (4), SH coefficients (3 x n, channel-major), depth offset.
    """

    def __init__(
        self,
        sh_degree: int = SH_DEGREE,
        gaussian_scale_min: float = SCALE_MIN,
        gaussian_scale_max: float = SCALE_MAX,
    ) -> None:
        super().__init__()
        self.sh_degree = sh_degree
        self.scale_min = gaussian_scale_min
        self.scale_max = gaussian_scale_max

    @property
    def d_sh(self) -> int:
        return spherical_harmonics.coefficient_count(self.sh_degree)

    @property
    def d_in(self) -> int:
        """Raw channels the head must predict (its output has one more: the density)."""
        return 2 + 3 + 4 + 3 * self.d_sh + 1

    def forward(
        self,
        extrinsics: torch.Tensor,
        intrinsics: torch.Tensor,
        depth: torch.Tensor,
        opacities: torch.Tensor,
        raw: torch.Tensor,
    ) -> GaussianMaps:
        """extrinsics (B, S, 3|4, 4) world-to-camera and intrinsics (B, S, 3, 3) in pixels, as
        predicted; depth (B, S, H, W); opacities (B, S, H, W); raw (B, S, H, W, d_in)."""
        height, width = depth.shape[-2:]
        cam_to_world = invert_rigid(extrinsics[..., :3, :])
        normalised = intrinsics.clone()
        normalised[..., 0, :] /= width
        normalised[..., 1, :] /= height
        offset_xy, scale_logits, quat, sh, depth_offset = raw.split(
            (2, 3, 4, 3 * self.d_sh, 1), dim=-1
        )
        depth = depth + depth_offset[..., 0]
        return GaussianMaps(
            means=_means(cam_to_world, normalised, depth, offset_xy),
            scales=self._scales(scale_logits, normalised, depth),
            rotations=_world_rotations(quat, cam_to_world[..., :3]),
            opacities=opacities,
            harmonics=self._harmonics(sh, cam_to_world[..., :3]),
        )

    def _scales(
        self, logits: torch.Tensor, normalised: torch.Tensor, depth: torch.Tensor
    ) -> torch.Tensor:
        """Scale logits (B, S, H, W, 3) -> standard deviations in world units."""
        height, width = depth.shape[-2:]
        fraction = self.scale_min + (self.scale_max - self.scale_min) * logits.sigmoid()
        pixel = torch.tensor([1.0 / width, 1.0 / height], dtype=depth.dtype, device=depth.device)
        footprint = _FOOTPRINT * (torch.linalg.inv(normalised[..., :2, :2]) @ pixel).sum(-1)
        return fraction * depth[..., None] * footprint[..., None, None, None]

    def _harmonics(self, sh: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
        """Camera-frame SH (B, S, H, W, 3 n), channel-major, and camera-to-world rotations
        (B, S, 3, 3) -> world frame (B, S, H, W, 3, n)."""
        sh = sh.unflatten(-1, (3, self.d_sh))
        damping = [1.0] + [0.1 * 0.25 ** math.isqrt(k) for k in range(1, self.d_sh)]
        sh = sh * torch.tensor(damping, dtype=sh.dtype, device=sh.device)
        if self.sh_degree == 0:
            return sh
        return _rotate_per_view(sh, cam_to_world)


def _means(
    cam_to_world: torch.Tensor,
    normalised: torch.Tensor,
    depth: torch.Tensor,
    offset_xy: torch.Tensor,
) -> torch.Tensor:
    """World position of each pixel's Gaussian: camera centre + unit ray x depth (B, S, H, W, 3).

    Pixel centres in normalised image coordinates ((i + 0.5) / W, (j + 0.5) / H), shifted by
    offset_xy pixels, are unprojected with the normalised intrinsics.
    """
    height, width = depth.shape[-2:]
    device, dtype = depth.device, depth.dtype
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2)
    pixel = torch.tensor([1.0 / width, 1.0 / height], dtype=dtype, device=device)
    xy = grid + offset_xy * pixel
    points = torch.cat([xy, torch.ones_like(xy[..., :1])], dim=-1)  # (B, S, H, W, 3)
    # Per view: unproject, normalise, turn to the world (one matrix product per view).
    rays = _per_view(points, torch.linalg.inv(normalised))
    rays = _per_view(rays / rays.norm(dim=-1, keepdim=True), cam_to_world[..., :3])
    return cam_to_world[..., None, None, :, 3] + rays * depth[..., None]


def _per_view(vectors: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """(B, S, H, W, 3) vectors times one (B, S, 3, 3) matrix per view -> (B, S, H, W, 3)."""
    flat = vectors.flatten(-3, -2) @ matrices.mT
    return flat.unflatten(-2, vectors.shape[-3:-1])


def _rotate_per_view(harmonics: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3, n) SH coefficients turned by one (..., 3, 3) rotation per view."""
    flat = spherical_harmonics.rotate(harmonics.flatten(-4, -2), rotation)
    return flat.unflatten(-2, harmonics.shape[-4:-1])


def _world_rotations(quat: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    """Rotation channels (B, S, H, W, 4) and camera-to-world rotations (B, S, 3, 3) ->
    quaternions (B, S, H, W, 4), read as (w, x, y, z).

    Follows the reference's conventions exactly: the channels (a, b, c, d) are taken as the
    quaternion with vector part (d, a, b) and real part c, composed after the camera's rotation,
    and the result is written in (x, y, z, w) component order with w >= 0; that vector is what
    the head's training renderer read as (w, x, y, z). (The reference goes through rotation
    matrices; composing quaternions gives the same numbers, per pixel without 3 x 3 products.)
    """
    quat = quat / (quat.norm(dim=-1, keepdim=True) + _QUAT_EPS)
    camera_frame = quat[..., [2, 3, 0, 1]]  # (w, x, y, z) = (c, d, a, b)
    view = rotation_to_quaternion(cam_to_world)[..., [3, 0, 1, 2]]  # (w, x, y, z)
    world = _quaternion_product(view[..., None, None, :], camera_frame)
    world = world / world.norm(dim=-1, keepdim=True)
    xyzw = world[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:] < 0, -xyzw, xyzw)


def _quaternion_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a b of (w, x, y, z) quaternions (..., 4): rotation b, then a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def reframe(
    gaussians: GaussianMaps, source: torch.Tensor, target: torch.Tensor, scale: float
) -> GaussianMaps:
    """Move (S, H, W, ...) Gaussians view by view from the world of the `source` cameras to that
    of the `target` cameras (both (S, 3|4, 4) world-to-camera), dividing lengths by `scale`:
    each Gaussian keeps its place in its own view's camera frame, as depth does when predicted
    poses are replaced by given ones."""
    src_rot, src_t = source[:, :3, :3], source[:, :3, 3]
    dst_rot, dst_t = target[:, :3, :3], target[:, :3, 3]
    per_pixel = (slice(None), None, None)
    camera = (src_rot[per_pixel] @ gaussians.means[..., None])[..., 0] + src_t[per_pixel]
    means = (dst_rot.mT[per_pixel] @ (camera / scale - dst_t[per_pixel])[..., None])[..., 0]
    delta = dst_rot.mT @ src_rot  # (S, 3, 3): source world -> target world
    delta_quat = rotation_to_quaternion(delta)[..., [3, 0, 1, 2]]  # (w, x, y, z)
    rotations = _quaternion_product(delta_quat[per_pixel], gaussians.rotations)
    rotations = rotations / rotations.norm(dim=-1, keepdim=True)
    harmonics = _rotate_per_view(gaussians.harmonics, delta)
    return GaussianMaps(means, gaussians.scales / scale, rotations, gaussians.opacities, harmonics)
