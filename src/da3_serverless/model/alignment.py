"""Metric scale and sky handling of DA3 depth maps (mono, metric and nested models).

- `metric_depth_from_focal`: raw output of the metric model -> meters (x focal_px / 300).
- `mono_sky_fill`: models with a sky head put sky pixels at the far end of the scene.
- `align_to_metric`: the nested model scales its any-view depth (and camera translations) to the
  metric branch by least squares on confident non-sky pixels, then fills the sky.

Each batch sample is one scene: quantiles, sky fill and the metric scale are taken per sample,
never across the batch. Quantiles are exact, over every pixel of the set (`exact_quantile`),
where the reference estimates them from 100000 pixels drawn at random: a draw over the non-sky
pixels changes entirely when one pixel joins or leaves the set, so a float-rounding flip of one
pixel's sky probability would move the whole sky fill. The exact quantile moves by at most one
rank. Below 100000 values the two are the same; above, the reference's estimate lies within its
sampling error of ours (docs/ARCHITECTURE.md, "Parity"). Inputs are never modified; results are
new tensors. Shapes: B batch, S views, H x W depth map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The metric model predicts depth for a focal length of this many pixels.
METRIC_FOCAL_PX = 300.0
# Sky probability at or above which a pixel counts as sky.
SKY_THRESHOLD = 0.3
# Below this many sky or non-sky pixels the sky is left alone.
_MIN_PIXELS = 10
# Sky depth of the nested model: the 99th percentile of the rest of the scene, capped (meters).
_SKY_QUANTILE = 0.99
_MAX_SKY_DEPTH_M = 200.0
# Pixels below these depths are left out of the scale fit.
_MIN_DEPTH = 1e-3
_MIN_METRIC_DEPTH_M = 1e-2


@dataclass
class MetricAlignment:
    """Result of `align_to_metric`: depth (B, S, H, W) in meters, depth_conf (B, S, H, W) with
    sky at 1, extrinsics (B, S, 3|4, 4) with translations in meters, and the applied scale of
    each sample (B,)."""

    depth: torch.Tensor
    depth_conf: torch.Tensor
    extrinsics: torch.Tensor
    scale: torch.Tensor

    @property
    def scale_factor(self) -> float:
        """The scale of a batch of one sample."""
        if self.scale.numel() != 1:
            raise ValueError(f"{self.scale.numel()} samples have a scale each: read `scale`")
        return self.scale.item()


def non_sky_mask(sky: torch.Tensor, threshold: float = SKY_THRESHOLD) -> torch.Tensor:
    """Sky probabilities (...) -> bool mask (...), True where the pixel is not sky."""
    return sky < threshold


def metric_depth_from_focal(
    depth: torch.Tensor, intrinsics: torch.Tensor, focal_px: float = METRIC_FOCAL_PX
) -> torch.Tensor:
    """Metric-model depth (B, S, H, W) and pixel intrinsics (B, S, 3, 3) -> meters (B, S, H, W):
    depth x mean(fx, fy) / 300."""
    focal = (intrinsics[..., 0, 0] + intrinsics[..., 1, 1]) / 2
    return depth * (focal[..., None, None] / focal_px)


def least_squares_scale(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Scalar s minimising |target - s * source|^2 over all elements (0-dim tensor)."""
    target, source = target.reshape(-1), source.reshape(-1)
    return torch.dot(target, source) / torch.dot(source, source).clamp_min(1e-12)


def fill_sky(
    depth: torch.Tensor,
    non_sky: torch.Tensor,
    sky_depth: torch.Tensor | float,
    depth_conf: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copies of depth (and confidence) with sky pixels (~non_sky) set to `sky_depth` (and 1)."""
    depth = depth.masked_fill(~non_sky, sky_depth)
    if depth_conf is not None:
        depth_conf = depth_conf.masked_fill(~non_sky, 1.0)
    return depth, depth_conf


def exact_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of values (n,), n >= 1, interpolated linearly between the two nearest
    ranks as `torch.quantile` does, without its size limit (0-dim tensor)."""
    position = q * (values.numel() - 1)
    low = int(position)
    below = values.kthvalue(low + 1).values
    if low + 1 >= values.numel() or position == low:
        return below
    above = values.kthvalue(low + 2).values
    return torch.lerp(below, above, position - low)


def mono_sky_fill(depth: torch.Tensor, sky: torch.Tensor) -> torch.Tensor:
    """Depth (B, S, H, W) of a model with a sky head and its sky map (B, S, H, W) -> depth with
    each sample's sky pixels at the 99th percentile of its other pixels' depth. A sample is
    unchanged when either region has 10 pixels or fewer; `depth` itself comes back when all
    are."""
    pieces = [depth[i : i + 1] for i in range(depth.shape[0])]
    filled = [_mono_sky_fill_sample(piece, sky[i : i + 1]) for i, piece in enumerate(pieces)]
    if all(new is old for new, old in zip(filled, pieces, strict=True)):
        return depth
    return filled[0] if len(filled) == 1 else torch.cat(filled)


def _mono_sky_fill_sample(depth: torch.Tensor, sky: torch.Tensor) -> torch.Tensor:
    """`mono_sky_fill` of one sample (1, S, H, W); returns `depth` itself when unchanged."""
    non_sky = non_sky_mask(sky)
    if non_sky.sum() <= _MIN_PIXELS or (~non_sky).sum() <= _MIN_PIXELS:
        return depth
    far = exact_quantile(depth[non_sky], _SKY_QUANTILE)
    return fill_sky(depth, non_sky, far)[0]


def align_to_metric(
    depth: torch.Tensor,
    depth_conf: torch.Tensor,
    extrinsics: torch.Tensor,
    intrinsics: torch.Tensor,
    metric_depth: torch.Tensor,
    metric_sky: torch.Tensor,
) -> MetricAlignment:
    """Nested model: bring the any-view branch to the metric branch's scale, per sample.

    depth, depth_conf (B, S, H, W), extrinsics (B, S, 3|4, 4) world-to-camera and pixel
    intrinsics (B, S, 3, 3) of the any-view branch; metric_depth (raw, after `mono_sky_fill`) and
    metric_sky (B, S, H, W) of the metric branch.

    Each sample is one scene with its own scale. The metric depth is converted with the any-view
    intrinsics; the scale is fitted on non-sky pixels whose confidence is at least the median
    non-sky confidence; sky pixels then get the 99th percentile of the scaled non-sky depth (at
    most 200 m) and confidence 1. With 10 non-sky pixels or fewer (the reference gives up
    there), every pixel is treated as non-sky.
    """
    metric = metric_depth_from_focal(metric_depth, intrinsics)
    samples = [
        _align_sample(
            depth[i : i + 1],
            depth_conf[i : i + 1],
            extrinsics[i : i + 1],
            metric[i : i + 1],
            metric_sky[i : i + 1],
        )
        for i in range(depth.shape[0])
    ]
    if len(samples) == 1:
        return samples[0]
    return MetricAlignment(
        depth=torch.cat([s.depth for s in samples]),
        depth_conf=torch.cat([s.depth_conf for s in samples]),
        extrinsics=torch.cat([s.extrinsics for s in samples]),
        scale=torch.cat([s.scale for s in samples]),
    )


def _align_sample(
    depth: torch.Tensor,
    depth_conf: torch.Tensor,
    extrinsics: torch.Tensor,
    metric: torch.Tensor,
    metric_sky: torch.Tensor,
) -> MetricAlignment:
    """`align_to_metric` of one sample (batch of 1), the metric depth already in meters."""
    non_sky = non_sky_mask(metric_sky)
    sky_present = bool(non_sky.sum() > _MIN_PIXELS)
    if not sky_present:
        non_sky = torch.ones_like(non_sky)

    median_conf = exact_quantile(depth_conf[non_sky], 0.5)
    fit = (
        (depth_conf >= median_conf)
        & non_sky
        & (metric > _MIN_METRIC_DEPTH_M)
        & (depth > _MIN_DEPTH)
    )
    scale = least_squares_scale(metric[fit], depth[fit])
    depth = depth * scale
    extrinsics = extrinsics.clone()
    extrinsics[..., :3, 3] *= scale

    if sky_present:
        far = exact_quantile(depth[non_sky], _SKY_QUANTILE)
        depth, depth_conf = fill_sky(depth, non_sky, far.clamp_max(_MAX_SKY_DEPTH_M), depth_conf)
    return MetricAlignment(depth, depth_conf, extrinsics, scale.reshape(1))
