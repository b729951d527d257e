"""DINOv2 ViT backbone of DA3: patch tokens of every view, with alternating per-view ("local")
and cross-view ("global") attention from ``alt_start`` on.

From ``alt_start`` on, the first token of each view is a camera token (learned, or encoded
from given cameras). With three or more views and no given cameras, a reference view is
chosen just before that point and moved to the front (the learned token marks view 0 as the
reference); outputs are returned in the caller's view order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from da3_serverless.model.layers import Block, rope_angles, stop_point

PATCH_SIZE = 14
# Views needed before a reference view is chosen; with fewer, the first view is the reference.
MIN_VIEWS_FOR_REF_SELECTION = 3


@dataclass(frozen=True)
class VitSize:
    dim: int
    depth: int
    heads: int
    swiglu: bool


VIT_SIZES = {
    "vits": VitSize(384, 12, 6, False),
    "vitb": VitSize(768, 12, 12, False),
    "vitl": VitSize(1024, 24, 16, False),
    "vitg": VitSize(1536, 40, 24, True),
}


class PatchEmbed(nn.Module):
    """14x14 patches to tokens: (B, 3, H, W) -> (B, H/14 * W/14, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """The token embedding and transformer blocks (state-dict names of the checkpoints)."""

    def __init__(self, size: VitSize, alt_start: int, qknorm_start: int) -> None:
        super().__init__()
        self.embed_dim = size.dim
        self.num_heads = size.heads
        self.patch_embed = PatchEmbed(size.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.dim))
        if alt_start != -1:
            # Token 0: the reference view, token 1: every other view.
            self.camera_token = nn.Parameter(torch.zeros(1, 2, size.dim))
        grid = 518 // PATCH_SIZE  # trained position grid: 37 x 37
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, size.dim))
        self.blocks = nn.ModuleList(
            Block(
                size.dim,
                size.heads,
                swiglu=size.swiglu,
                qk_norm=qknorm_start != -1 and i >= qknorm_start,
            )
            for i in range(size.depth)
        )
        self.norm = nn.LayerNorm(size.dim)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows*cols, dim) position embedding, bicubic-resized from the 37x37 grid."""
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        if rows == cols == grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        # The checkpoints were trained with this scale factor (+0.1 offset) rather than a
        # target size; it changes the sampling positions, so keep it.
        patch = F.interpolate(
            patch,
            scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
            mode="bicubic",
            antialias=False,
        )
        patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat((pos[:, :1], patch), dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, S, 3, H, W) -> tokens (B, S, 1 + H/14*W/14, dim), class token first."""
        b, s, _, h, w = images.shape
        x = self.patch_embed(images.flatten(0, 1))
        x = torch.cat((self.cls_token.expand(b * s, -1, -1), x), dim=1)
        pos = self.position_embedding(h // PATCH_SIZE, w // PATCH_SIZE)
        x = x + pos.to(x.dtype)
        return x.unflatten(0, (b, s))


class DinoV2(nn.Module):
    """DA3 backbone.

    forward(images (B, S, 3, H, W), cam_token (B, S, dim) or None, check) -> list, one entry per
    ``out_layers`` layer, of (features (B, S, H/14*W/14, C), camera token (B, S, C)), where
    C = 2*dim with ``cat_token`` (last local-attention output, then the normalised current
    output) and dim otherwise (normalised output). ``check`` (a callable that raises to stop)
    is called before every block and handed to the blocks.
    """

    def __init__(
        self,
        name: str,
        out_layers: list[int],
        alt_start: int = -1,
        qknorm_start: int = -1,
        rope_start: int = -1,
        cat_token: bool = True,
    ) -> None:
        super().__init__()
        if name not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {name!r}; expected one of {sorted(VIT_SIZES)}")
        self.out_layers = list(out_layers)
        self.alt_start = alt_start
        self.rope_start = rope_start
        self.cat_token = cat_token
        self.pretrained = VisionTransformer(VIT_SIZES[name], alt_start, qknorm_start)

    def _rope_tables(
        self, rows: int, cols: int, views: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE angles for local attention (one view: T tokens) and global (S*T tokens).

        Local: patch (r, c) sits at (r+1, c+1), the camera/class token at (0, 0). Global: every
        patch token sits at (1, 1), so across views only token content matters.
        """
        head_dim = self.pretrained.embed_dim // self.pretrained.num_heads
        r, c = torch.meshgrid(
            torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij"
        )
        local = torch.stack((r.flatten(), c.flatten()), dim=-1) + 1
        special = torch.zeros(1, 2, dtype=local.dtype, device=device)
        local = torch.cat((special, local))
        flat = torch.cat((special, torch.ones_like(local[1:])))
        return rope_angles(local, head_dim), rope_angles(flat, head_dim).repeat(views, 1)

    def forward(
        self,
        images: torch.Tensor,
        cam_token: torch.Tensor | None = None,
        check: Callable[[], None] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        vit = self.pretrained
        b, s, _, h, w = images.shape
        x = vit.embed(images)
        n = x.shape[2]
        local_rope = global_rope = None
        if self.rope_start != -1:
            local_rope, global_rope = self._rope_tables(
                h // PATCH_SIZE, w // PATCH_SIZE, s, x.device
            )

        order = None  # view permutation applied (reference view first), if any
        local_x = x
        outputs = []
        for i, block in enumerate(vit.blocks):
            if check is not None:
                stop_point(check)
            use_rope = self.rope_start != -1 and i >= self.rope_start
            if self.alt_start != -1:
                if (
                    i == self.alt_start - 1
                    and s >= MIN_VIEWS_FOR_REF_SELECTION
                    and cam_token is None
                ):
                    order = reference_first_order(x[:, :, 0])
                    x, local_x = take_views(x, order), take_views(local_x, order)
                if i == self.alt_start:
                    x = x.clone()
                    x[:, :, 0] = (
                        cam_token
                        if cam_token is not None
                        else learned_camera_token(vit.camera_token, b, s)
                    )
            if self.alt_start != -1 and i >= self.alt_start and i % 2 == 1:
                rope = global_rope if use_rope else None
                x = block(x.reshape(b, s * n, -1), rope, check).reshape(b, s, n, -1)
            else:
                rope = local_rope if use_rope else None
                x = block(x.reshape(b * s, n, -1), rope, check).reshape(b, s, n, -1)
                local_x = x
            if i in self.out_layers:
                out = torch.cat((local_x, x), dim=-1) if self.cat_token else x
                if order is not None:
                    out = take_views(out, torch.argsort(order, dim=1))
                outputs.append(out)
        return [self._finish(out) for out in outputs]

    def _finish(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise (only the current half with cat_token), split off the first token."""
        dim = self.pretrained.embed_dim
        norm = self.pretrained.norm
        token = out[:, :, 0]
        if self.cat_token:
            feats = torch.cat((out[..., :dim], norm(out[..., dim:])), dim=-1)
        else:
            feats = norm(out)
        return feats[:, :, 1:], token


def learned_camera_token(camera_token: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """(1, 2, dim) learned tokens -> (B, S, dim): token 0 for view 0, token 1 for the rest."""
    ref = camera_token[:, :1].expand(b, 1, -1)
    others = camera_token[:, 1:].expand(b, s - 1, -1)
    return torch.cat((ref, others), dim=1)


def reference_first_order(cls_tokens: torch.Tensor) -> torch.Tensor:
    """View order (B, S) that puts the chosen reference view first, others in input order.

    The reference is the "most typical" view: the one whose mean cosine similarity to the
    other views, token norm and token variance (each min-max scaled over the views) are all
    closest to the middle of their ranges. cls_tokens: (B, S, dim).
    """
    b, s, _ = cls_tokens.shape
    unit = cls_tokens / cls_tokens.norm(dim=-1, keepdim=True)
    sim = unit @ unit.transpose(1, 2) - torch.eye(s, device=unit.device)
    scores = (sim.sum(-1) / (s - 1), cls_tokens.norm(dim=-1), unit.var(dim=-1))

    def spread_from_middle(v: torch.Tensor) -> torch.Tensor:
        lo, hi = v.min(dim=1, keepdim=True).values, v.max(dim=1, keepdim=True).values
        return ((v - lo) / (hi - lo + 1e-8) - 0.5).abs()

    ref = sum(spread_from_middle(v) for v in scores).argmin(dim=1)  # (B,)
    idx = torch.arange(s, device=ref.device).expand(b, s)
    # Position p > 0 holds view p-1 while p <= ref, else view p; position 0 holds ref.
    order = torch.where((idx > 0) & (idx <= ref[:, None]), idx - 1, idx)
    order[:, 0] = ref
    return order


def take_views(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, S, ...) reordered along views by order (B, S)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], order]
