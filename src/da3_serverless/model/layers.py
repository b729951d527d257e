"""Transformer building blocks shared by the ViT backbone and the camera encoder.

Module and parameter names follow the official checkpoints (``attn.qkv``, ``ls1.gamma``,
``mlp.fc1`` / ``mlp.w12`` ...), so state dicts load unchanged.

A forward may be given ``check``, a callable that raises to stop it (a cancelled job): it is
called between blocks and, on CPU, where one block over many views takes seconds, between
slices of a block (``Block.forward``), so a stop takes effect within a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Work (FLOP) of one slice of a block run in slices: about a quarter of a second on two cores.
SLICE_FLOP = 16e9
# Fewest queries per attention slice: PyTorch's CPU attention works in tiles of 256 queries
# only when given at least 768 of them; smaller slices run in smaller, slower tiles.
MIN_QUERY_SLICE = 768


def _call(check: Callable[[], None]) -> None:
    check()


# What stop_point calls: `_call` itself until keep_stop_points_out_of_compile() wraps it. Not
# wrapped at import: `torch.compiler.disable` imports torch._dynamo (and sympy), over a second
# of every cold start, which only a process that compiles needs.
_untraced_call: Callable[[Callable[[], None]], None] = _call


def stop_point(check: Callable[[], None]) -> None:
    """Call ``check`` (it raises to stop the forward). Never traced by ``torch.compile`` (once
    keep_stop_points_out_of_compile() ran), so a compiled network really calls it rather than
    a value frozen at compile time."""
    _untraced_call(check)


def keep_stop_points_out_of_compile() -> None:
    """Make every stop_point a graph break that ``torch.compile`` calls as it is; call this
    before compiling a network (Predictor.compile does)."""
    global _untraced_call
    _untraced_call = torch.compiler.disable(_call)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Two linear layers with GELU: ``dim -> hidden -> out``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated FFN of the giant ViT: ``w3(silu(a) * b)`` where ``a, b = w12(x)``.

    The hidden width is 2/3 of the nominal one, rounded up to a multiple of 8, as trained.
    """

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden)
        self.w3 = nn.Linear(hidden, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 100.0) -> torch.Tensor:
    """Rotation angles of 2D rotary embeddings.

    positions: (T, 2) integer (row, column) per token. Returns (T, head_dim) fp32 angles laid
    out as [row | row | column | column] quarters, matching how ``apply_rope`` pairs channels:
    the first half of each head is rotated by the row position, the second by the column.
    """
    quarter = head_dim // 4
    exponents = torch.arange(0, 2 * quarter, 2, device=positions.device).float() / (2 * quarter)
    inv_freq = 1.0 / (base**exponents)
    ang = positions.float()[..., None] * inv_freq  # (T, 2, quarter)
    rows, cols = ang[:, 0], ang[:, 1]
    return torch.cat((rows, rows, cols, cols), dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (..., T, head_dim) by ``angles`` (T, head_dim).

    Within each half of the head (row half, column half), channel i is paired with channel
    i + quarter. cos/sin are taken in x's dtype, as the network was trained.
    """
    angles = angles.to(x.dtype)
    cos, sin = angles.cos(), angles.sin()
    q = x.shape[-1] // 4
    a, b, c, d = x.split(q, dim=-1)
    rotated = torch.cat((-b, a, -d, c), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention via ``scaled_dot_product_attention``, optional QK-norm and RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim); rope: (T, head_dim) angles or None. Returns (B, T, dim)."""
        b, t, dim = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, dim))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale: x + ls1(attn(norm1 x)), + ls2(mlp(norm2 x)).

    ln_eps is 1e-6 in the backbone and the LayerNorm default (1e-5) in the camera encoder.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        swiglu: bool = False,
        qk_norm: bool = False,
        layer_scale: float = 1.0,
        ln_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = SwiGLU(dim, hidden) if swiglu else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, layer_scale)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        check: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, dim); rope: (T, head_dim) angles or None; ``check`` (on CPU): see
        ``in_slices``."""
        if check is not None and x.device.type == "cpu":
            return self.in_slices(x, rope, check)
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def in_slices(
        self, x: torch.Tensor, rope: torch.Tensor | None, check: Callable[[], None]
    ) -> torch.Tensor:
        """The same block a slice at a time, calling ``check`` between slices: queries, keys and
        values in slices of tokens, the attention in slices of queries, then the projection and
        the MLP in slices of tokens. Equal to ``forward`` to rounding; about ``SLICE_FLOP`` of
        work per slice (token slices stay large: small matrix products are slow on CPU)."""
        attn = self.attn
        b, t, dim = x.shape
        flat = x.reshape(b * t, dim)  # token-wise layers see the batch's tokens as rows
        parts = []
        for rows in _slices(b * t, SLICE_FLOP / (6 * dim * dim)):
            stop_point(check)
            parts.append(attn.qkv(self.norm1(flat[rows])))
        qkv = parts[0] if len(parts) == 1 else torch.cat(parts)
        qkv = qkv.reshape(b, t, 3, attn.num_heads, dim // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        mixed = torch.empty_like(x)
        for entries, rows in _attention_slices(b, t, dim):
            stop_point(check)
            part = F.scaled_dot_product_attention(q[entries, :, rows], k[entries], v[entries])
            mixed[entries, rows] = part.transpose(1, 2).flatten(2)
        del parts, qkv, q, k, v
        mixed, out = mixed.reshape(b * t, dim), torch.empty_like(flat)
        for rows in _slices(b * t, SLICE_FLOP / (18 * dim * dim)):
            stop_point(check)
            y = flat[rows] + self.ls1(attn.proj(mixed[rows]))
            out[rows] = y + self.ls2(self.mlp(self.norm2(y)))
        return out.reshape(b, t, dim)


def _attention_slices(b: int, t: int, dim: int) -> list[tuple[slice, slice]]:
    """(batch entries, queries) of each attention slice: whole entries while they fit in
    ``SLICE_FLOP``, else one entry at a time in slices of queries."""
    queries = SLICE_FLOP / (4 * t * dim)  # of one entry
    if queries >= t:
        return [(entries, slice(None)) for entries in _slices(b, queries / t)]
    step = max(MIN_QUERY_SLICE, queries // 256 * 256)
    return [(slice(i, i + 1), rows) for i in range(b) for rows in _slices(t, step)]


def _slices(total: int, per_slice: float) -> list[slice]:
    """``range(total)`` in slices of ``per_slice`` (at least 1) items."""
    step = max(1, int(per_slice))
    return [slice(start, start + step) for start in range(0, total, step)]
