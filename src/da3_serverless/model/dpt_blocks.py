"""Building blocks shared by the DPT and DualDPT heads (`model/dpt.py`).

Everything here is pure torch and works on NCHW feature maps. Module attribute names follow the
official checkpoints (`resConfUnit1`, `out_conv`, `layer1_rn`, ...) so weights load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from da3_serverless.model.layers import stop_point

# Views per chunk on CPU when the forward can be stopped between chunks: one view alone runs
# at about half the speed of two or more.
CPU_CHECKED_CHUNK = 2
# Largest number of output elements handed to one `F.interpolate` call; CUDA kernels index with
# 32-bit integers, so bigger batches are resized in slices along the batch dimension.
_MAX_RESIZE_ELEMENTS = 1_610_612_736


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with `align_corners=True`: (N, C, h, w) -> (N, C, *size)."""
    size = (int(size[0]), int(size[1]))
    total = size[0] * size[1] * x.shape[0] * x.shape[1]
    if total <= _MAX_RESIZE_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    slices = x.chunk(total // _MAX_RESIZE_ELEMENTS + 1, dim=0)
    out = [F.interpolate(s, size=size, mode="bilinear", align_corners=True) for s in slices]
    return torch.cat(out, dim=0)


def activate(x: torch.Tensor, name: str) -> torch.Tensor:
    """Output activation by its config name: exp, expp1 (exp + 1), relu, sigmoid or linear."""
    if name == "exp":
        return torch.exp(x)
    if name == "expp1":
        return torch.exp(x) + 1
    if name == "relu":
        return torch.relu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "linear":
        return x
    raise ValueError(f"unknown activation {name!r}")


def uv_position_embedding(
    channels: int, height: int, width: int, aspect_ratio: float, device: torch.device
) -> torch.Tensor:
    """Sinusoidal embedding of normalised image-plane coordinates: (channels, height, width), fp32.

    The grid spans the image with the given width/height ratio, normalised by its diagonal and
    sampled at cell centres. The first half of the channels encodes x, the second half y, each as
    [sin, cos] of the coordinate times frequencies 100^(-k / (channels / 4)).
    """
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    x_extent = aspect_ratio / diagonal * (width - 1) / width
    y_extent = 1.0 / diagonal * (height - 1) / height
    xs = torch.linspace(-x_extent, x_extent, width, dtype=torch.float32, device=device)
    ys = torch.linspace(-y_extent, y_extent, height, dtype=torch.float32, device=device)
    quarter = channels // 4
    freqs = torch.arange(quarter, dtype=torch.float32, device=device) / quarter
    freqs = 1.0 / 100.0**freqs  # (C/4,)

    def embed(coords: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, C/2)
        angles = coords[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    ex = embed(xs)[None, :, :].expand(height, width, 2 * quarter)
    ey = embed(ys)[:, None, :].expand(height, width, 2 * quarter)
    return torch.cat([ex, ey], dim=-1).permute(2, 0, 1)


def add_position_embedding(x: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Add 0.1 x `uv_position_embedding` (aspect ratio of the input image) to (N, C, h, w) maps."""
    pe = uv_position_embedding(
        x.shape[1], x.shape[2], x.shape[3], image_hw[1] / image_hw[0], x.device
    )
    return x + 0.1 * pe.to(x.dtype)


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))) with 3x3 convolutions; (N, C, h, w) -> same shape."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class FeatureFusionBlock(nn.Module):
    """One top-down refinement step: [+ lateral unit] -> unit -> bilinear upsample -> 1x1 conv.

    `forward(top, lateral=None, size=None)`: top and lateral (N, C, h, w) -> (N, C, *size), or
    twice the input size when `size` is None.
    """

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features) if has_residual else None
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(
        self,
        top: torch.Tensor,
        lateral: torch.Tensor | None = None,
        size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        y = top
        if lateral is not None and self.resConfUnit1 is not None:
            y = y + self.resConfUnit1(lateral)
        y = self.resConfUnit2(y)
        if size is None:
            size = (y.shape[2] * 2, y.shape[3] * 2)
        return self.out_conv(resize_bilinear(y, size))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension of (N, C, h, w) maps (same parameters as LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Scratch(nn.Module):
    """Container whose attribute names match the checkpoints' `scratch.*` keys.

    Holds the per-level 3x3 adapters `layer{1..4}_rn` (no bias) and the fusion chain
    `refinenet{1..4}{suffix}` for each suffix in `chains`; heads attach their own output layers.
    """

    def __init__(self, in_channels: Sequence[int], features: int, chains: Sequence[str]) -> None:
        super().__init__()
        for level, channels in enumerate(in_channels, start=1):
            conv = nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False)
            setattr(self, f"layer{level}_rn", conv)
        for suffix in chains:
            for level in range(1, 5):
                block = FeatureFusionBlock(features, has_residual=level != 4)
                setattr(self, f"refinenet{level}{suffix}", block)

    def fuse(self, levels: Sequence[torch.Tensor], suffix: str = "") -> torch.Tensor:
        """Coarse-to-fine fusion of the 4 adapted levels with chain `suffix`.

        levels: (N, F, 4p, 4q), (N, F, 2p, 2q), (N, F, p, q), (N, F, p/2, q/2) for a p x q patch
        grid -> (N, F, 8p, 8q).
        """
        l1, l2, l3, l4 = levels
        out = getattr(self, f"refinenet4{suffix}")(l4, size=l3.shape[2:])
        out = getattr(self, f"refinenet3{suffix}")(out, l3, size=l2.shape[2:])
        out = getattr(self, f"refinenet2{suffix}")(out, l2, size=l1.shape[2:])
        return getattr(self, f"refinenet1{suffix}")(out, l1)


class PyramidHeadBase(nn.Module):
    """Common front of the DPT heads: 4 layers of patch tokens -> adapted 4-level pyramid.

    Per level: token norm -> (N, C, p, q) map -> 1x1 projection to `out_channels[i]` ->
    [position embedding] -> resampling by x4, x2, x1, /2 -> 3x3 adapter to `features` channels.
    Attribute names match the checkpoints (`norm`, `projects`, `resize_layers`, `scratch`).
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int,
        features: int,
        out_channels: Sequence[int],
        layer_norm: bool,
        pos_embed: bool,
        chains: Sequence[str],
    ) -> None:
        super().__init__()
        if len(out_channels) != 4:
            raise ValueError(f"out_channels must have 4 entries, got {list(out_channels)}")
        self.patch_size = patch_size
        self.pos_embed = pos_embed
        self.norm = nn.LayerNorm(dim_in) if layer_norm else nn.Identity()
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, c, kernel_size=1) for c in out_channels])
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4),
                nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = Scratch(out_channels, features, chains)

    def _levels(
        self, tokens: Sequence[torch.Tensor], image_hw: tuple[int, int]
    ) -> list[torch.Tensor]:
        """tokens: 4 x (N, p*q, dim_in) patch tokens -> 4 maps (N, features, 4p|2p|p|p/2, ...)."""
        p, q = image_hw[0] // self.patch_size, image_hw[1] // self.patch_size
        adapters = [self.scratch.layer1_rn, self.scratch.layer2_rn]
        adapters += [self.scratch.layer3_rn, self.scratch.layer4_rn]
        out = []
        for x, project, resize, adapt in zip(
            tokens, self.projects, self.resize_layers, adapters, strict=True
        ):
            x = self.norm(x).transpose(1, 2).reshape(x.shape[0], x.shape[2], p, q)
            x = project(x)
            if self.pos_embed:
                x = add_position_embedding(x, image_hw)
            out.append(adapt(resize(x)))
        return out

    def _output_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Size of the dense outputs: the patch grid times the patch size (H, W cropped to it)."""
        p = self.patch_size
        return (image_hw[0] // p * p, image_hw[1] // p * p)

    def _run(
        self,
        frames: Callable[..., dict[str, torch.Tensor]],
        feats: Sequence[Sequence[torch.Tensor]],
        H: int,
        W: int,
        patch_start_idx: int,
        chunk_size: int | None,
        check: Callable[[], None] | None = None,
        per_view: Sequence[torch.Tensor] = (),
        **kwargs: bool,
    ) -> dict[str, torch.Tensor]:
        """Flatten the views of `feats` and run `frames` on at most `chunk_size` views of one
        batch sample at once (None: all its views).

        feats: 4 entries whose first item is (B, S, T, dim_in) tokens; `frames(tokens,
        *per_view, (H, W), **kwargs)` maps 4 x (n, T', dim_in) patch tokens (and the same n
        views of each (B, S, ...) tensor of `per_view`, such as the input images) to a dict of
        (n, ...) tensors. Returns the same dict with leading (B, S). A chunk never mixes batch
        samples: convolution kernels pick their algorithm (and so their rounding) by batch
        size, and a sample's maps must not depend on its batch-mates (a sky probability near
        the threshold would flip). `check` (raises to stop) is called before every chunk; on
        CPU, where a view at process_res 1008 takes a second or two, chunks are then
        `CPU_CHECKED_CHUNK` views.
        """
        B, S = feats[0][0].shape[:2]
        dtype = self.projects[0].weight.dtype  # backbone tokens may come in bf16
        tokens = [f[0].flatten(0, 1)[:, patch_start_idx:].to(dtype) for f in feats]
        extras = [v.flatten(0, 1).to(dtype) for v in per_view]
        step = S if chunk_size is None else max(1, min(chunk_size, S))
        if check is not None and tokens[0].device.type == "cpu":
            step = min(step, CPU_CHECKED_CHUNK)
        starts = [(b * S + v, min(step, S - v)) for b in range(B) for v in range(0, S, step)]
        parts = []
        for i, size in starts:
            if check is not None:
                stop_point(check)
            chunk = [t[i : i + size] for t in tokens]
            parts.append(frames(chunk, *[v[i : i + size] for v in extras], (H, W), **kwargs))
        return {k: torch.cat([p[k] for p in parts]).unflatten(0, (B, S)) for k in parts[0]}
