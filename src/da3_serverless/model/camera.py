"""Camera components of the any-view DA3 networks and the 9-number pose encoding they share.

Pose encoding (..., 9): camera-to-world translation (3), camera-to-world rotation as a unit
quaternion in x, y, z, w order with w >= 0 (4), vertical and horizontal field of view in radians
(2). The principal point is implied at the image centre.

- `CameraEnc`: known extrinsics + intrinsics -> one camera token per view for the backbone.
- `CameraDec`: the backbone's camera token -> pose encoding.
- `pose_encoding_from_camera` / `camera_from_pose_encoding`: conversions both ways.

Module names and state-dict keys follow the reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from da3_serverless.model.layers import Block, Mlp

# Width of the pose encoding: translation 3 + quaternion 4 + field of view 2.
POSE_ENCODING_DIM = 9


def invert_rigid(transform: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms [R | t]: (..., 3, 4) or (..., 4, 4) -> [R^T | -R^T t]."""
    rot_t = transform[..., :3, :3].mT
    top = torch.cat([rot_t, -rot_t @ transform[..., :3, 3:]], dim=-1)
    return torch.cat([top, transform[..., 3:, :]], dim=-2)


def quaternion_to_rotation(quat: torch.Tensor) -> torch.Tensor:
    """Quaternions (..., 4) in x, y, z, w order (any norm) -> rotation matrices (..., 3, 3)."""
    x, y, z, w = quat.unbind(-1)
    s = 2.0 / (quat * quat).sum(-1)
    rows = (
        (1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)),
        (s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)),
        (s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)),
    )
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def rotation_to_quaternion(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) in x, y, z, w order, w >= 0.

    Each of w, x, y, z can be recovered from the diagonal; the one with the largest magnitude is
    used as the pivot for the other three, which keeps the division well conditioned.
    """
    m = rot.flatten(-2)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    # 4 * (w^2, x^2, y^2, z^2)
    four_sq = torch.stack(
        [
            1 + m00 + m11 + m22,
            1 + m00 - m11 - m22,
            1 - m00 + m11 - m22,
            1 - m00 - m11 + m22,
        ],
        dim=-1,
    )
    two_abs = torch.sqrt(four_sq.clamp_min(0))  # 2 |w|, 2 |x|, 2 |y|, 2 |z|
    # Row k: 4 * q_k * (w, x, y, z), from the pivot component k.
    scaled = torch.stack(
        [
            torch.stack([two_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, two_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, two_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, two_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    candidates = scaled / (2.0 * two_abs.clamp_min(0.1))[..., None]
    pivot = two_abs.argmax(dim=-1)[..., None, None].expand(*rot.shape[:-2], 1, 4)
    wxyz = candidates.gather(-2, pivot).squeeze(-2)
    xyzw = wxyz[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:] < 0, -xyzw, xyzw)


def pose_encoding_from_camera(
    cam_to_world: torch.Tensor, intrinsics: torch.Tensor, image_hw: Sequence[int]
) -> torch.Tensor:
    """cam_to_world (B, S, 3|4, 4), intrinsics (B, S, 3, 3) in pixels of an image of size
    image_hw = (H, W) -> pose encoding (B, S, 9), fp32."""
    height, width = image_hw
    quat = rotation_to_quaternion(cam_to_world[..., :3, :3])
    fov_h = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    parts = [cam_to_world[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]]
    return torch.cat(parts, dim=-1).float()


def camera_from_pose_encoding(
    encoding: torch.Tensor, image_hw: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose encoding (B, S, 9) -> (cam_to_world (B, S, 3, 4), intrinsics (B, S, 3, 3)) in pixels
    of an image of size image_hw = (H, W), principal point at the image centre."""
    height, width = image_hw
    rot = quaternion_to_rotation(encoding[..., 3:7])
    cam_to_world = torch.cat([rot, encoding[..., :3, None]], dim=-1)
    fy = (height / 2.0) / torch.tan(encoding[..., 7] / 2.0).clamp_min(1e-6)
    fx = (width / 2.0) / torch.tan(encoding[..., 8] / 2.0).clamp_min(1e-6)
    intrinsics = torch.zeros(*encoding.shape[:-1], 3, 3, device=encoding.device)
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = width / 2
    intrinsics[..., 1, 2] = height / 2
    intrinsics[..., 2, 2] = 1.0
    return cam_to_world, intrinsics


class CameraEnc(nn.Module):
    """Known cameras -> camera tokens: pose encoding -> MLP -> norm -> transformer trunk -> norm.

    forward(ext (B, S, 3|4, 4) world-to-camera, ixt (B, S, 3, 3) pixels, image_size (H, W))
    -> tokens (B, S, dim_out). Runs in fp32.
    """

    def __init__(
        self,
        dim_out: int = 1024,
        dim_in: int = POSE_ENCODING_DIM,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4,
        init_values: float = 0.01,
    ) -> None:
        super().__init__()
        self.pose_branch = Mlp(dim_in, dim_out // 2, dim_out)
        self.token_norm = nn.LayerNorm(dim_out)
        self.trunk = nn.Sequential(
            *[
                Block(dim_out, num_heads, mlp_ratio=mlp_ratio, layer_scale=init_values, ln_eps=1e-5)
                for _ in range(trunk_depth)
            ]
        )
        self.trunk_norm = nn.LayerNorm(dim_out)

    def forward(
        self, ext: torch.Tensor, ixt: torch.Tensor, image_size: Sequence[int]
    ) -> torch.Tensor:
        encoding = pose_encoding_from_camera(invert_rigid(ext), ixt, image_size)
        tokens = self.token_norm(self.pose_branch(encoding))
        return self.trunk_norm(self.trunk(tokens))


class CameraDec(nn.Module):
    """Camera token -> pose encoding: 2-layer ReLU MLP, then translation, quaternion and
    field-of-view (ReLU, non-negative) projections.

    forward(feat (B, S, dim_in)) -> pose encoding (B, S, 9), fp32.
    """

    def __init__(self, dim_in: int = 1536) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, dim_in), nn.ReLU()
        )
        self.fc_t = nn.Linear(dim_in, 3)
        self.fc_qvec = nn.Linear(dim_in, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim_in, 2), nn.ReLU())

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(feat.to(self.fc_t.weight.dtype))
        return torch.cat([self.fc_t(hidden), self.fc_qvec(hidden), self.fc_fov(hidden)], dim=-1)
