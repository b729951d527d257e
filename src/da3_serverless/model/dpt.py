"""Dense prediction heads of DA3: `DPT` (mono / metric models) and `DualDPT` (any-view models).

Both take the 4 backbone layers the network exports and return a plain `dict[str, Tensor]`.
State-dict keys and constructor argument names are those of the reference implementation, so
official checkpoints load strictly. Heads are meant to run in fp32 (callers disable autocast).

Shapes: B batch, S views, T tokens per view, p x q = (H / patch) x (W / patch) patch grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from da3_serverless.model.dpt_blocks import (
    ChannelLayerNorm,
    PyramidHeadBase,
    activate,
    add_position_embedding,
    resize_bilinear,
)

# Channels of the last hidden layer of every output branch.
_HIDDEN = 32
# DualDPT ray branch output: 3 direction + 3 origin channels, then 1 confidence channel.
_RAY_CHANNELS = 7


def _output_branch(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv -> ReLU -> 1x1 conv; indices 0 and 2 hold the weights (checkpoint layout)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, _HIDDEN, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(_HIDDEN, out_channels, kernel_size=1),
    )


class DPT(PyramidHeadBase):
    """Single-branch DPT head: depth (+ sky) maps at input resolution.

    Forward returns {head_name: (B, S, H, W)} and, with `use_sky_head`, {sky_name: (B, S, H, W)}.
    Only `output_dim=1` exists in the released models (no confidence channel).
    """

    def __init__(
        self,
        dim_in: int,
        *,
        patch_size: int = 14,
        output_dim: int = 1,
        activation: str = "exp",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        pos_embed: bool = False,
        head_name: str = "depth",
        use_sky_head: bool = True,
        sky_name: str = "sky",
        sky_activation: str = "relu",
        norm_type: str = "idt",
    ) -> None:
        if output_dim != 1:
            raise ValueError(f"DPT supports output_dim=1 only, got {output_dim}")
        if norm_type not in ("idt", "layer"):
            raise ValueError(f"norm_type must be 'idt' or 'layer', got {norm_type!r}")
        super().__init__(
            dim_in, patch_size, features, out_channels, norm_type == "layer", pos_embed, ("",)
        )
        self.activation = activation
        self.head_name = head_name
        self.sky_name = sky_name if use_sky_head else None
        self.sky_activation = sky_activation
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.scratch.output_conv2 = _output_branch(features // 2, output_dim)
        if use_sky_head:
            self.scratch.sky_output_conv2 = _output_branch(features // 2, 1)

    def forward(
        self,
        feats: Sequence[Sequence[torch.Tensor]],
        H: int,
        W: int,
        patch_start_idx: int,
        chunk_size: int | None = 8,
        check: Callable[[], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """feats: 4 entries whose first item is (B, S, T, dim_in) tokens; H, W: input image size;
        tokens before `patch_start_idx` are not patches; `chunk_size` views are decoded at once;
        `check` (raises to stop) is called between chunks.
        """
        return self._run(self._frames, feats, H, W, patch_start_idx, chunk_size, check)

    def _frames(
        self, tokens: Sequence[torch.Tensor], image_hw: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        fused = self.scratch.fuse(self._levels(tokens, image_hw))
        fused = self.scratch.output_conv1(fused)
        fused = resize_bilinear(fused, self._output_size(image_hw))
        if self.pos_embed:
            fused = add_position_embedding(fused, image_hw)
        out = {self.head_name: activate(self.scratch.output_conv2(fused), self.activation)[:, 0]}
        if self.sky_name is not None:
            sky = self.scratch.sky_output_conv2(fused)
            out[self.sky_name] = activate(sky, self.sky_activation)[:, 0]
        return out


class DualDPT(PyramidHeadBase):
    """DPT with two independent fusion chains: depth + confidence, and a per-pixel ray map.

    Forward returns {main: (B, S, H, W), main_conf: (B, S, H, W)} and, when `compute_rays` is
    true, {aux: (B, S, 8p, 8q, 6) rays (3 direction + 3 origin, not normalised), aux_conf:
    (B, S, 8p, 8q)}, with (main, aux) = `head_names`. The ray map stays at the finest fusion
    level (8x the patch grid), it is not resized to the image.
    """

    def __init__(
        self,
        dim_in: int,
        *,
        patch_size: int = 14,
        output_dim: int = 2,
        activation: str = "exp",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        pos_embed: bool = True,
        aux_pyramid_levels: int = 4,
        aux_out1_conv_num: int = 5,
        head_names: tuple[str, str] = ("depth", "ray"),
    ) -> None:
        if output_dim != 2:
            raise ValueError(
                f"DualDPT predicts depth + confidence (output_dim=2), got {output_dim}"
            )
        super().__init__(dim_in, patch_size, features, out_channels, True, pos_embed, ("", "_aux"))
        self.activation = activation
        self.conf_activation = conf_activation
        self.head_main, self.head_aux = head_names
        half = features // 2
        self.scratch.output_conv1 = nn.Conv2d(features, half, kernel_size=3, padding=1)
        self.scratch.output_conv2 = _output_branch(half, output_dim)
        # The checkpoints hold one ray neck and output branch per pyramid level, but only the last
        # (finest) level is ever decoded. All output branches share one LayerNorm, as in the
        # released networks (whose files store it once, under the first level's name).
        self.scratch.output_conv1_aux = nn.ModuleList(
            [_ray_neck(features, aux_out1_conv_num) for _ in range(aux_pyramid_levels)]
        )
        ray_norm = ChannelLayerNorm(_HIDDEN)
        self.scratch.output_conv2_aux = nn.ModuleList(
            [_ray_output_branch(half, ray_norm) for _ in range(aux_pyramid_levels)]
        )

    def forward(
        self,
        feats: Sequence[Sequence[torch.Tensor]],
        H: int,
        W: int,
        patch_start_idx: int,
        chunk_size: int | None = 8,
        compute_rays: bool = True,
        check: Callable[[], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """feats: 4 entries whose first item is (B, S, T, dim_in) tokens; H, W: input image size;
        tokens before `patch_start_idx` are not patches; `chunk_size` views are decoded at once;
        `compute_rays=False` skips the ray chain entirely (depth and confidence are unchanged);
        `check` (raises to stop) is called between chunks.
        """
        return self._run(
            self._frames, feats, H, W, patch_start_idx, chunk_size, check, compute_rays=compute_rays
        )

    def _frames(
        self, tokens: Sequence[torch.Tensor], image_hw: tuple[int, int], compute_rays: bool
    ) -> dict[str, torch.Tensor]:
        levels = self._levels(tokens, image_hw)
        fused = self.scratch.output_conv1(self.scratch.fuse(levels))
        fused = resize_bilinear(fused, self._output_size(image_hw))
        if self.pos_embed:
            fused = add_position_embedding(fused, image_hw)
        logits = self.scratch.output_conv2(fused)
        out = {
            self.head_main: activate(logits[:, 0], self.activation),
            f"{self.head_main}_conf": activate(logits[:, 1], self.conf_activation),
        }
        if compute_rays:
            rays = self.scratch.output_conv1_aux[-1](self.scratch.fuse(levels, "_aux"))
            if self.pos_embed:
                rays = add_position_embedding(rays, image_hw)
            logits = self.scratch.output_conv2_aux[-1](rays)
            out[self.head_aux] = logits[:, :6].permute(0, 2, 3, 1)
            out[f"{self.head_aux}_conf"] = activate(logits[:, 6], self.conf_activation)
        return out


def _ray_neck(features: int, num_convs: int) -> nn.Sequential:
    """`num_convs` (1, 3 or 5) 3x3 convs alternating features -> features/2 -> features ...,
    ending at features/2; no activations in between (checkpoint layout)."""
    if num_convs not in (1, 3, 5):
        raise ValueError(f"aux_out1_conv_num must be 1, 3 or 5, got {num_convs}")
    widths = [features if i % 2 == 0 else features // 2 for i in range(num_convs + 1)]
    return nn.Sequential(
        *[nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in itertools.pairwise(widths)]
    )


def _ray_output_branch(in_channels: int, norm: ChannelLayerNorm) -> nn.Sequential:
    """3x3 conv -> channel LayerNorm `norm` -> ReLU -> 1x1 conv to 7 channels.

    The reference wraps its LayerNorm in two permutes, so the weights sit at indices 0, 2 and 5;
    identities at 1 and 3 keep that layout.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, _HIDDEN, kernel_size=3, padding=1),
        nn.Identity(),
        norm,
        nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(_HIDDEN, _RAY_CHANNELS, kernel_size=1),
    )
