"""Camera pose and intrinsics from the ray map of the DualDPT head (the `use_ray_pose` path).

Each ray-map cell holds a ray direction (3) and origin (3) in world space. The image plane is
normalised to span 2 units each way, principal point at (1, 1). Per view, a weighted RANSAC fits
the homography that maps the cell centres (x, y, 1) of an identity camera to the ray directions;
its QL decomposition gives the rotation (Q) and the intrinsics (L). The camera centre is the
confidence-weighted mean of the ray origins.

RANSAC sampling uses one generator per batch sample (`rng.per_sample_generators`; by default
fresh seeded ones), so the same input always gives the same camera whatever its batch-mates; it
draws the same numbers in the same order as the reference implementation does from the global
generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from da3_serverless.model.camera import invert_rigid
from da3_serverless.model.rng import per_sample_generators

Generators = torch.Generator | Sequence[torch.Generator] | None

_RANSAC_ITERATIONS = 100
_POINTS_PER_SAMPLE = 8
# Samples are drawn from this fraction of the most confident cells.
_CANDIDATE_FRACTION = 0.3
# Inlier when the reprojected direction lands this close (normalised image units).
_REPROJECTION_THRESHOLD = 0.2
# Directions this close to the image plane (|z|) cannot be projected onto it and get weight 0.
_MIN_DEPTH = 1e-4
# The final fit uses at most this many inliers, drawn from the 95 % most confident.
_MAX_INLIERS = 8000
_INLIER_KEEP_FRACTION = 0.95


def camera_from_rays(
    ray: torch.Tensor, ray_conf: torch.Tensor, generator: Generators = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ray (B, S, h, w, 6) direction + origin, ray_conf (B, S, h, w) weights ->
    cam_to_world (B, S, 4, 4), focal (B, S, 2) and principal point (B, S, 2) as (x, y) in
    normalised units (the image spans 2; fx in pixels = focal_x * W / 2, cx = pp_x * W / 2).
    `generator` drives the RANSAC sampling: one per sample, None means fresh seeded ones."""
    B, S, h, w, _ = ray.shape
    generators = per_sample_generators(generator, B, ray.device)
    rays = ray.flatten(0, 1).flatten(1, 2)  # (n, N, 6)
    weights = ray_conf.flatten(0, 1).flatten(1, 2)  # (n, N)
    n_points = rays.shape[1]

    directions = rays[..., :3]
    projectable = directions[..., 2].abs() > _MIN_DEPTH
    target = torch.where(
        projectable[..., None], directions[..., :2] / directions[..., 2:], directions[..., :2]
    )
    weights = weights.masked_fill(~projectable, 0.0)
    source = _cell_centres(h, w, ray.device)

    n_candidates = max(_POINTS_PER_SAMPLE, int(n_points * _CANDIDATE_FRACTION))
    homographies = []
    for sample, generator in enumerate(generators):
        # Per sample, as the reference draws for a batch of one: the RANSAC subsets, then
        # each view's refit.
        subsets = _ransac_subsets(n_candidates, generator, ray.device)
        for i in range(sample * S, (sample + 1) * S):
            homographies.append(
                _ransac_homography(source, target[i], weights[i], subsets, n_candidates, generator)
            )
    homographies = torch.stack(homographies)
    homographies = torch.where(
        (torch.linalg.det(homographies) < 0)[:, None, None], -homographies, homographies
    )
    rotation, lower = _ql_decomposition(homographies)
    lower = lower / lower[:, 2:, 2:]
    focal = torch.stack([lower[:, 0, 0], lower[:, 1, 1]], dim=-1)
    principal = lower[:, 2, :2]

    centre = (rays[..., 3:] * weights[..., None]).sum(1) / weights.sum(-1, keepdim=True)
    cam_to_world = torch.zeros(rays.shape[0], 4, 4, dtype=ray.dtype, device=ray.device)
    cam_to_world[:, :3, :3] = rotation
    cam_to_world[:, :3, 3] = centre
    cam_to_world[:, 3, 3] = 1.0
    return (
        cam_to_world.unflatten(0, (B, S)),
        (1.0 / focal).unflatten(0, (B, S)),
        (principal + 1.0).unflatten(0, (B, S)),
    )


def pose_from_rays(
    ray: torch.Tensor,
    ray_conf: torch.Tensor,
    image_hw: Sequence[int],
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ray (B, S, h, w, 6), ray_conf (B, S, h, w) of an image of size image_hw = (H, W) ->
    world-to-camera extrinsics (B, S, 3, 4) and pixel intrinsics (B, S, 3, 3).
    `generator`: see `camera_from_rays`."""
    height, width = image_hw
    cam_to_world, focal, principal = camera_from_rays(ray, ray_conf, generator)
    extrinsics = invert_rigid(cam_to_world)[..., :3, :]
    intrinsics = torch.eye(3, device=ray.device).repeat(*extrinsics.shape[:2], 1, 1)
    intrinsics[..., 0, 0] = focal[..., 0] / 2 * width
    intrinsics[..., 1, 1] = focal[..., 1] / 2 * height
    intrinsics[..., 0, 2] = principal[..., 0] * width * 0.5
    intrinsics[..., 1, 2] = principal[..., 1] * height * 0.5
    return extrinsics, intrinsics


def _ransac_subsets(
    n_candidates: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(iterations, k) random subsets of k point indices below `n_candidates`."""
    return torch.stack(
        [
            torch.randperm(n_candidates, generator=generator, device=device)[:_POINTS_PER_SAMPLE]
            for _ in range(_RANSAC_ITERATIONS)
        ]
    )


def _cell_centres(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Centres of an h x w grid of cells covering [0, 2]^2, minus the principal point (1, 1):
    (h*w, 2) as (x, y), row-major."""
    half_x, half_y = 1.0 - 1.0 / w, 1.0 - 1.0 / h  # centre to outermost cell centre
    xs = torch.linspace(1.0 - half_x, 1.0 + half_x, w, device=device) - 1.0
    ys = torch.linspace(1.0 - half_y, 1.0 + half_y, h, device=device) - 1.0
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def _fit_homographies(src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted direct linear transform: src, dst (b, k, 2), weight (b, k) -> H (b, 3, 3) with
    H[2, 2] = 1 minimising sum weight * |dst x (H src)|^2 (homogeneous, k >= 4)."""
    sw = weight.sqrt()[..., None]
    x, y = src[..., 0:1], src[..., 1:2]
    u, v = dst[..., 0:1], dst[..., 1:2]
    zero = torch.zeros_like(x)
    rows_u = [-x * sw, -y * sw, -sw, zero, zero, zero, x * u * sw, y * u * sw, u * sw]
    rows_v = [zero, zero, zero, -x * sw, -y * sw, -sw, x * v * sw, y * v * sw, v * sw]
    system = torch.cat([torch.cat(rows_u, dim=-1), torch.cat(rows_v, dim=-1)], dim=-2)
    # The null vector of the system is the right singular vector of the smallest singular value.
    vh = torch.linalg.svd(system, full_matrices=False).Vh
    h = vh[:, -1].reshape(-1, 3, 3)
    return h / h[:, 2:, 2:]


def _ransac_homography(
    src: torch.Tensor,
    dst: torch.Tensor,
    weight: torch.Tensor,
    samples: torch.Tensor,
    n_candidates: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """src, dst (N, 2), weight (N,), samples (iterations, k) indices into the `n_candidates`
    most confident points -> homography (3, 3) refitted on the best sample's inliers."""
    candidates = torch.argsort(weight, descending=True)[:n_candidates]
    picked = candidates[samples]
    hypotheses = _fit_homographies(src[picked], dst[picked], weight[picked])

    src_h = torch.cat([src, torch.ones_like(src[:, :1])], dim=-1)
    iterations = hypotheses.shape[0]
    projected = torch.bmm(src_h.expand(iterations, -1, -1), hypotheses.transpose(1, 2))
    error = (projected[..., :2] / projected[..., 2:] - dst).square().sum(-1).sqrt()
    inliers = error < _REPROJECTION_THRESHOLD
    best = int((inliers * weight).sum(-1).argmax())
    mask = inliers[best]
    if int(mask.sum()) < 4:
        # Too few inliers to refit: keep the best hypothesis as it is.
        return hypotheses[best]

    src, dst, weight = src[mask], dst[mask], weight[mask]
    order = torch.argsort(weight, descending=True)
    if order.numel() > _MAX_INLIERS:
        keep = max(int(order.numel() * _INLIER_KEEP_FRACTION), _MAX_INLIERS)
        pick = torch.randperm(keep, generator=generator, device=order.device)[:_MAX_INLIERS]
        order = order[:keep][pick]
    return _fit_homographies(src[order][None], dst[order][None], weight[order][None])[0]


def _ql_decomposition(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m (n, 3, 3) -> (Q orthogonal, L lower triangular with a positive diagonal), m = Q L.

    QR of m with its columns reversed, then the factors reversed back.
    """
    q, r = torch.linalg.qr(m.flip(-1))
    q = q.flip(-1)
    lower = r.flip(-2).flip(-1)
    sign = torch.diagonal(lower, dim1=-2, dim2=-1).sign()
    return q * sign[:, None, :], lower * sign[:, :, None]
