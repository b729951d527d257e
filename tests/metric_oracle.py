"""Oracle networks for the metric scale at any `process_res`: stand-ins with DA3's interfaces
that answer a known scene exactly as a perfect network would, so what remains of a metric
answer's dependence on `process_res` is the service's own bookkeeping (resizing, the focal
length carried into network pixels, the nested alignment, the maps resized back).

The scene: a plane seen by a camera of focal length `focal_px` (input pixels, square pixels,
principal point at the centre), its depth growing down the image, Z = 2 + 3 v metres (v the
normalised row, 0 at the top edge, 1 at the bottom). At a network input of w x h for an input
of W x H, the camera's focal lengths in network pixels are fx = focal w / W, fy = focal h / H
(they differ when the sides' rounding to the 14-pixel patch stretches the image).

- `MetricOracle` answers as DA3METRIC-LARGE: canonical depth Z x 300 / mean(fx, fy) (its
  documented convention: metres = output x focal / 300, focal the mean of fx and fy), no sky.
- `AnyViewOracle` answers as an any-view network: depth Z / 2.7 (relative: any scale), full
  confidence, identity pose, intrinsics fx, fy at the centre.
- `nested_oracle` joins the two in the nested model's own class (`NestedDepthAnything3Net`),
  whose alignment brings the any-view depth to the metric one.
"""

from __future__ import annotations

import torch
from torch import nn

from da3_serverless.model.net import NestedDepthAnything3Net, NetOutput

CANONICAL_FOCAL_PX = 300.0
RELATIVE_SCALE = 2.7


def true_depth(height: int, width: int) -> torch.Tensor:
    """The scene's depth (metres) at the centres of a height x width grid over the image."""
    rows = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    return (2.0 + 3.0 * rows)[:, None].expand(height, width)


class _Oracle(nn.Module):
    has_gaussians = False

    def __init__(self, focal_px: float, input_size: tuple[int, int]):
        super().__init__()
        self.focal_px = focal_px
        self.input_size = input_size  # (W, H) of the photo the service was given

    def focals(self, height: int, width: int) -> tuple[float, float]:
        """(fx, fy) in network pixels for a network input of width x height."""
        input_width, input_height = self.input_size
        return self.focal_px * width / input_width, self.focal_px * height / input_height

    def _maps(self, images: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        batch, views = images.shape[:2]
        return depth.to(torch.float32).expand(batch, views, *depth.shape).contiguous()


class MetricOracle(_Oracle):
    """DA3METRIC-LARGE's answer for the scene: canonical depth and a sky probability of 0."""

    def forward(self, images: torch.Tensor, *args, **kwargs) -> NetOutput:
        height, width = images.shape[-2:]
        fx, fy = self.focals(height, width)
        canonical = true_depth(height, width) * CANONICAL_FOCAL_PX / ((fx + fy) / 2)
        depth = self._maps(images, canonical)
        return NetOutput(depth=depth, sky=torch.zeros_like(depth))


class AnyViewOracle(_Oracle):
    """An any-view network's answer for the scene, in a relative scale."""

    def forward(self, images: torch.Tensor, *args, **kwargs) -> NetOutput:
        batch, views = images.shape[:2]
        height, width = images.shape[-2:]
        fx, fy = self.focals(height, width)
        depth = self._maps(images, true_depth(height, width) / RELATIVE_SCALE)
        intrinsics = torch.tensor(
            [[fx, 0.0, width / 2], [0.0, fy, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float32
        )
        pose = torch.eye(4, dtype=torch.float32)[:3]
        return NetOutput(
            depth=depth,
            confidence=torch.ones_like(depth),
            extrinsics=pose.expand(batch, views, 3, 4).contiguous(),
            intrinsics=intrinsics.expand(batch, views, 3, 3).contiguous(),
        )


def nested_oracle(focal_px: float, input_size: tuple[int, int]) -> NestedDepthAnything3Net:
    """The nested model's class over the two oracles."""
    return NestedDepthAnything3Net(
        AnyViewOracle(focal_px, input_size), MetricOracle(focal_px, input_size)
    )
