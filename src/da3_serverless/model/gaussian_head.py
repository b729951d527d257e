"""The 3D-Gaussian head of the giant any-view releases (`gs_head.*` in their checkpoints).

A DPT pyramid over the same 4 backbone layers as the depth head, whose upsampled features also
see the input image (a small conv stack, `images_merger`), ending in one raw Gaussian
parameter vector and one density per pixel. `model/gaussians.py` turns those into world-space
Gaussians. State-dict keys follow the reference implementation, so checkpoints load strictly.
Runs in fp32 (callers disable autocast); bf16 tokens are cast up.

Shapes: B batch, S views, T tokens per view, H x W input image (multiples of the patch size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from da3_serverless.model.dpt_blocks import PyramidHeadBase, add_position_embedding, resize_bilinear

# Channels of the last hidden layer of the output branch.
_HIDDEN = 32


class GaussianHead(PyramidHeadBase):
    """Backbone tokens + input images -> raw Gaussian parameters and densities per pixel.

    forward(feats, H, W, patch_start_idx, images) returns {"raw_gs": (B, S, H, W, output_dim - 1)
    unactivated parameters, "raw_gs_conf": (B, S, H, W) densities in (0, 1) (sigmoid)}.
    """

    def __init__(
        self,
        dim_in: int,
        *,
        patch_size: int = 14,
        output_dim: int = 38,
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        pos_embed: bool = True,
    ) -> None:
        super().__init__(dim_in, patch_size, features, out_channels, False, pos_embed, ("",))
        self.out_dim = output_dim
        half = features // 2
        self.scratch.output_conv1 = nn.Conv2d(features, half, kernel_size=3, padding=1)
        # Indices 0 and 2 hold the weights (checkpoint layout).
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(half, _HIDDEN, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(_HIDDEN, output_dim, kernel_size=1),
        )
        # Image features added at full resolution; weights at indices 0, 2 and 4.
        self.images_merger = nn.Sequential(
            nn.Conv2d(3, half // 4, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(half // 4, half // 2, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(half // 2, half, kernel_size=3, padding=1),
            nn.GELU(),
        )

    def forward(
        self,
        feats: Sequence[Sequence[torch.Tensor]],
        H: int,
        W: int,
        patch_start_idx: int,
        images: torch.Tensor,
        chunk_size: int | None = 8,
    ) -> dict[str, torch.Tensor]:
        """feats: 4 entries whose first item is (B, S, T, dim_in) tokens; images: the network's
        normalised input (B, S, 3, H, W); `chunk_size` views are decoded at once."""
        return self._run(self._frames, feats, H, W, patch_start_idx, chunk_size, per_view=[images])

    def _frames(
        self, tokens: Sequence[torch.Tensor], images: torch.Tensor, image_hw: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        fused = self.scratch.output_conv1(self.scratch.fuse(self._levels(tokens, image_hw)))
        fused = resize_bilinear(fused, self._output_size(image_hw))
        fused = fused + self.images_merger(images)
        if self.pos_embed:
            fused = add_position_embedding(fused, image_hw)
        logits = self.scratch.output_conv2(fused)
        return {
            "raw_gs": logits[:, :-1].permute(0, 2, 3, 1),
            "raw_gs_conf": torch.sigmoid(logits[:, -1]),
        }
